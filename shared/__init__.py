"""Common code of the agentmesh services: configuration, the gRPC server bootstrap,
interceptors, error mapping, deadlines, client channels, logging and metrics."""
