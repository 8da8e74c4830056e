"""The ``agentmesh`` command line: start the mesh, check it, chat with it."""
