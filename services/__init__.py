"""The three agentmesh services: inference, tools, orchestrator."""
