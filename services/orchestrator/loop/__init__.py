"""The agent turn loop. It knows nothing of gRPC: it talks to small ports (Protocols) and
yields typed domain events; the servicer maps those to the wire."""
