"""The orchestrator: durable sessions and the agent turn loop (plan -> parallel tool calls ->
observe -> streamed compose) over the inference and tools services."""
