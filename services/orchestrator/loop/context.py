"""Token-true context: every prompt fits the serving lane's window in that lane's tokens.

At the start of a turn one CountTokens call measures the fixed prefix (system prompt and
tools, never changed so the prefix cache holds), each history message and the user's
message. The budget is the window minus the largest stage output, the room this turn's tool
traffic may take (calls x observation tokens) and a margin. The user's message is cut (in
tokens) to its share when it is longer; the oldest history goes first. Every later prompt of
the turn then fits by construction: tool observations are cut to ``observe_tokens`` each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.orchestrator.loop.ports import InferencePort
from services.orchestrator.loop.types import LaneRequest, Message, Role, ToolDef

CUT_MARKER = "\n[... cut to fit the context window ...]"
# A tool result message costs its body plus its fence and the template's framing.
OBSERVATION_OVERHEAD_TOKENS = 40
# Instructions the stages append (plan, emission, answer) stay under this many tokens.
INSTRUCTION_TOKENS = 160


@dataclass(frozen=True)
class FittedContext:
    history: list[Message]
    user: Message
    observe_tokens: int
    dropped_messages: int
    user_cut: bool
    prompt_tokens: int
    max_model_len: int


async def fit_context(
    inference: InferencePort,
    lane: LaneRequest,
    *,
    base: Sequence[Message],
    history: Sequence[Message],
    user: Message,
    tools: Sequence[ToolDef],
    max_output_tokens: int,
    max_calls: int,
    observe_max_tokens: int,
    user_max_share: float,
    margin_tokens: int,
    timeout_s: float,
) -> FittedContext:
    msgs = [*base, *history, user]
    count = await inference.count_tokens(msgs, tools, lane, timeout_s=timeout_s)
    window = count.max_model_len
    per_msg = list(count.message_tokens) or [0] * len(msgs)
    framing = max(0, count.prompt_tokens - sum(per_msg))
    frame_each = framing // max(1, len(msgs))
    fixed = sum(per_msg[: len(base)]) + framing
    usable = window - max_output_tokens - margin_tokens - INSTRUCTION_TOKENS - fixed
    # Tool traffic takes at most half of what is left; observations shrink to fit it.
    traffic_room = max(0, usable // 2)
    observe = observe_max_tokens
    if max_calls > 0:
        per_call = traffic_room // max_calls - OBSERVATION_OVERHEAD_TOKENS
        observe = max(32, min(observe_max_tokens, per_call))
    traffic = max_calls * (observe + OBSERVATION_OVERHEAD_TOKENS)
    room = usable - traffic

    user_tokens = per_msg[-1] + frame_each
    user_cap = max(16, int(window * user_max_share))
    cut = False
    if user_tokens > min(user_cap, max(16, room)):
        limit = max(16, min(user_cap, room) - frame_each - 16)
        texts = await inference.count_tokens(
            (), tools, lane, texts=[user.content], truncate_to=limit, timeout_s=timeout_s
        )
        cut_text = texts.truncated_texts[0] if texts.truncated_texts else None
        if cut_text is not None:
            user = Message(Role.USER, cut_text + CUT_MARKER)
            user_tokens = limit + 16 + frame_each
            cut = True
    room -= user_tokens

    kept: list[Message] = []
    hist_tokens = [t + frame_each for t in per_msg[len(base) : len(base) + len(history)]]
    for message, tokens in zip(reversed(list(history)), reversed(hist_tokens), strict=True):
        if tokens > room:
            break
        kept.append(message)
        room -= tokens
    kept.reverse()
    while kept and kept[0].role is not Role.USER:  # start at a user message, never mid-turn
        kept.pop(0)
    used = fixed + user_tokens + sum(hist_tokens[len(history) - len(kept) :])
    return FittedContext(
        history=kept,
        user=user,
        observe_tokens=observe,
        dropped_messages=len(history) - len(kept),
        user_cut=cut,
        prompt_tokens=used,
        max_model_len=window,
    )
