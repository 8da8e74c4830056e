"""Tool output shaping: token estimate, truncation with a visible marker, source fencing.

The cut here is a transport ceiling (:data:`DEFAULT_MAX_OUTPUT_TOKENS`), not the model's
budget: the orchestrator truncates once more, in the real tokens of the lane that reads the
result. This cut only keeps a runaway result from crossing the mesh.

The token estimator is deliberately conservative (it over-counts compared with the BPE
tokenizers of the served models) so that a result we call "under N tokens" is under N for
the model too, without loading a tokenizer or downloading anything:

* each run of letters counts ceil(len / 4) tokens, at least 1 (BPE averages ~4.5 chars);
* each digit counts 1 token (several tokenizers split numbers into single digits);
* each other non-space character (JSON punctuation, symbols) counts 1 token;
* each line break counts 1 token; other whitespace is free (merged into the next token).
"""

from __future__ import annotations

import copy
import html
import json
import re
from dataclasses import dataclass
from typing import Any

_PIECES = re.compile(r"[^\W\d_]+|\d|\n|[^\w\s]|_")

TRUNCATION_KEY = "_truncated"
# Estimated tokens above which the tools service cuts a result (a transport ceiling).
DEFAULT_MAX_OUTPUT_TOKENS = 32_000


def estimate_tokens(text: str) -> int:
    """Conservative token count of ``text`` (see the module docstring)."""
    total = 0
    for match in _PIECES.finditer(text):
        piece = match.group()
        if piece[0].isalpha():
            total += max(1, (len(piece) + 3) // 4)
        else:
            total += 1
    return total


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


@dataclass(frozen=True)
class ShapedOutput:
    text: str  # compact JSON, always parseable
    truncated: bool
    original_tokens: int
    tokens: int


def shape_output(value: Any, max_tokens: int) -> ShapedOutput:
    """Serialise ``value``; above ``max_tokens`` shrink it and say so in the data itself.

    Shrinking keeps the JSON valid: drop trailing items of the largest list, then shorten
    the longest strings, until it fits. A ``_truncated`` note tells the model (and the user)
    that what it sees is partial.
    """
    text = dumps(value)
    original = estimate_tokens(text)
    if original <= max_tokens:
        return ShapedOutput(text, False, original, original)
    work = copy.deepcopy(value) if isinstance(value, dict) else {"data": copy.deepcopy(value)}
    note = (
        f"output cut to fit {max_tokens} tokens (was about {original}); "
        "ask a narrower question for the rest"
    )
    work[TRUNCATION_KEY] = note
    for _ in range(10_000):
        candidate = dumps(work)
        tokens = estimate_tokens(candidate)
        if tokens <= max_tokens:
            return ShapedOutput(candidate, True, original, tokens)
        if not _shrink_once(work):
            break
    # Nothing left to shrink structurally (e.g. one enormous key set): keep only the note.
    fallback = dumps({TRUNCATION_KEY: note})
    return ShapedOutput(fallback, True, original, estimate_tokens(fallback))


def _shrink_once(root: Any) -> bool:
    """Remove some content from the biggest list or string under ``root``; False if none."""
    best_list: list[Any] | None = None
    best_list_size = 0
    best_str: tuple[Any, Any, int] | None = None  # (container, key, length)
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        children: list[tuple[Any, Any]]
        if isinstance(node, dict):
            children = [(k, v) for k, v in node.items() if k != TRUNCATION_KEY]
        elif isinstance(node, list):
            children = list(enumerate(node))
            if len(node) > 1:
                size = len(dumps(node))
                if size > best_list_size:
                    best_list, best_list_size = node, size
        else:
            continue
        for key, child in children:
            if isinstance(child, dict | list):
                stack.append(child)
            elif (
                isinstance(child, str)
                and len(child) > 80
                and (best_str is None or len(child) > best_str[2])
            ):
                best_str = (node, key, len(child))
    if best_str is not None and (best_list is None or best_str[2] * 2 > best_list_size):
        container, key, length = best_str
        container[key] = container[key][: int(length * 0.6)] + "…[cut]"
        return True
    if best_list is not None:
        drop = max(1, len(best_list) // 4)
        del best_list[len(best_list) - drop :]
        return True
    if best_str is not None:
        container, key, length = best_str
        container[key] = container[key][: int(length * 0.6)] + "…[cut]"
        return True
    return False


def fence(*, tool: str, call_id: str, source: str, status: str, body: str) -> str:
    """Wrap tool output so a model can tell data from instructions.

    ``body`` is JSON; every ``<`` in it is written as the JSON escape ``\\u003c`` (only
    possible inside JSON strings, so the body stays valid JSON) and attribute values are
    HTML-escaped, so nothing in the data can close the fence or open a new one.
    """
    safe_body = body.replace("<", "\\u003c").replace(">", "\\u003e")
    attrs = " ".join(
        f'{key}="{html.escape(value, quote=True)}"'
        for key, value in (
            ("tool", tool),
            ("call_id", call_id),
            ("source", source),
            ("status", status),
        )
    )
    return f"<tool_result {attrs}>\n{safe_body}\n</tool_result>"
