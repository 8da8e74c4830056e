"""The inference service: vLLM engines in-process, model lanes, constrained tool calls."""
