"""CountTokens: token counts in a lane's own tokenizer, without engine work.

The prompt count renders exactly what Generate/StreamGenerate send the engine (same renderer,
same generation prompt); free texts are counted alone and optionally cut to a token limit so
that the cut text re-encodes to at most that many tokens. The request's bounds (counts, sizes)
are the request guard's (services/inference/request_checks.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agentmesh.common.v1 import common_pb2
from agentmesh.inference.v1 import inference_pb2 as pb

from services.inference.engine import Engine

_PARTIAL_CHAR = "\ufffd"


def truncate_to_tokens(engine: Engine, ids: list[int], limit: int) -> str:
    """The first ``limit`` tokens decoded, shortened until it re-encodes to at most ``limit``
    tokens and does not end inside a multi-byte character."""
    k = min(limit, len(ids))
    while k > 0:
        cut = engine.decode(ids[:k])
        if cut.endswith(_PARTIAL_CHAR):
            k -= 1
            continue
        again = len(engine.encode(cut))
        if again <= limit:
            return cut
        k -= max(1, again - limit)
    return ""


def count_text(engine: Engine, text: str, truncate_to: int) -> pb.TextTokens:
    ids = engine.encode(text)
    if truncate_to and len(ids) > truncate_to:
        return pb.TextTokens(
            tokens=len(ids),
            truncated=True,
            truncated_text=truncate_to_tokens(engine, ids, truncate_to),
        )
    return pb.TextTokens(tokens=len(ids))


@dataclass(frozen=True)
class Counts:
    prompt_tokens: int
    message_tokens: list[int]
    texts: list[pb.TextTokens]


def count_all(
    engine: Engine,
    prompt: str | None,
    messages: Sequence[common_pb2.ChatMessage],
    texts: Sequence[str],
    truncate_to: int,
) -> Counts:
    """Blocking (tokenizer work): run it off the event loop."""
    return Counts(
        prompt_tokens=len(engine.encode(prompt)) if prompt is not None else 0,
        message_tokens=[len(engine.encode(m.content)) for m in messages],
        texts=[count_text(engine, t, truncate_to) for t in texts],
    )
