"""Every span and attribute name agentmesh exports, in one place.

Pinned to the OpenTelemetry semantic conventions 1.44.0 (the schema of
``opentelemetry-semantic-conventions`` 0.66b2), GenAI names as opted into with
``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental``: ``gen_ai.provider.name`` (not the
old ``gen_ai.system``), ``gen_ai.usage.input_tokens`` / ``output_tokens`` (not ``prompt`` /
``completion``), ``gen_ai.usage.cache_read.input_tokens``. Names of our own live under
``agentmesh.``.
"""

from __future__ import annotations

SEMCONV_VERSION = "1.44.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
STABILITY_OPT_IN = "gen_ai_latest_experimental"

# ---- operations (span names are "{operation} {target}")
OP_INVOKE_AGENT = "invoke_agent"
OP_CHAT = "chat"
OP_EXECUTE_TOOL = "execute_tool"
PROVIDER_VLLM = "vllm"
TOOL_TYPE_FUNCTION = "function"
AGENT_NAME = "agentmesh"

# ---- gen_ai.* attributes
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_AGENT_ID = "gen_ai.agent.id"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_TOOL_TYPE = "gen_ai.tool.type"
GEN_AI_TOOL_CALL_ARGUMENTS = "gen_ai.tool.call.arguments"
GEN_AI_TOOL_CALL_RESULT = "gen_ai.tool.call.result"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
ERROR_TYPE = "error.type"

# ---- agentmesh.* attributes
AM_LANE = "agentmesh.lane"
AM_STAGE = "agentmesh.stage"
AM_TURN_INDEX = "agentmesh.turn.index"
AM_TURN_OUTCOME = "agentmesh.turn.outcome"
AM_TOOL_CALLS = "agentmesh.turn.tool_calls"
AM_PARSE_OUTCOME = "agentmesh.parse.outcome"
AM_PARSE_FAILURES = "agentmesh.parse.failures"
AM_ESCALATION_LEVEL = "agentmesh.escalation.level"
AM_ESCALATED = "agentmesh.escalated"
AM_GENERATIONS = "agentmesh.generations"
AM_SERVER_TTFT = "agentmesh.server.time_to_first_token"
AM_TOOL_STATUS = "agentmesh.tool.status"
AM_TOOL_SOURCE = "agentmesh.tool.source"
AM_TOOL_COUNT = "agentmesh.tool.count"

# ---- span names of our own
STAGE_SPAN_PREFIX = "stage "


def chat_span(model: str) -> str:
    return f"{OP_CHAT} {model}" if model else OP_CHAT


def tool_span(name: str) -> str:
    return f"{OP_EXECUTE_TOOL} {name}"


def agent_span(agent: str = AGENT_NAME) -> str:
    return f"{OP_INVOKE_AGENT} {agent}"


def stage_span(stage: str) -> str:
    return f"{STAGE_SPAN_PREFIX}{stage}"
