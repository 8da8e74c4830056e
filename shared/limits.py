"""Cheap structural checks on request fields, run before anything parses them.

``check_json_text`` bounds a JSON document's size and nesting depth by scanning the text
(strings are skipped by a regular expression, then only brackets are counted), so a
10,000-deep document is refused without ever reaching ``json.loads`` or a validator.
"""

from __future__ import annotations

import re
from collections.abc import Sized

from shared.errors import InvalidArgument

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def over_limit(field: str, message: str, reason: str, limit: int) -> InvalidArgument:
    """The INVALID_ARGUMENT for ``field`` crossing ``limit`` (named in its metadata)."""
    return InvalidArgument(field, message, reason=reason, metadata={"limit": str(limit)})


def json_depth(text: str) -> int:
    """Maximum nesting depth of the JSON text's arrays and objects (0 for a scalar).

    Brackets inside strings do not count. Malformed text gets a number too; it is only an
    upper bound for the parser that runs later and reports the syntax error itself.
    """
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub('""', text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(0, depth - 1)
    return deepest


def check_json_text(text: str, field: str, *, max_bytes: int, max_depth: int) -> None:
    """INVALID_ARGUMENT naming ``field`` and the limit when ``text`` is too big or too deep."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > max_bytes:
        raise over_limit(
            field,
            f"{size} bytes of JSON is over the limit of {max_bytes} bytes",
            "JSON_TOO_LARGE",
            max_bytes,
        )
    depth = json_depth(text)
    if depth > max_depth:
        raise over_limit(
            field,
            f"JSON nested {depth} levels deep is over the limit of {max_depth}",
            "JSON_TOO_DEEP",
            max_depth,
        )


def check_count(items: Sized, field: str, limit: int) -> None:
    if len(items) > limit:
        raise over_limit(
            field, f"{len(items)} entries is over the limit of {limit}", "TOO_MANY", limit
        )


def check_chars(text: str, field: str, limit: int) -> None:
    if len(text) > limit:
        raise over_limit(
            field, f"{len(text)} characters is over the limit of {limit}", "TOO_LONG", limit
        )


def check_pattern(text: str, field: str, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.fullmatch(text):
        raise InvalidArgument(field, f"must be {what}", reason="BAD_FORMAT")


def check_enum(value: int, field: str, known: set[int] | frozenset[int]) -> None:
    """Proto3 enums are open: a number the contract does not define is refused here."""
    if value not in known:
        raise InvalidArgument(field, f"unknown enum value {value}", reason="UNKNOWN_ENUM")
