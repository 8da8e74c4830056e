"""Redaction of personal data from anything exported (spans, recorded turns): e-mail
addresses, card numbers and phone numbers are replaced by a marker."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# 13-19 digits, optionally grouped by spaces or dashes (payment card numbers).
CARD = re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])")
# A phone-like run: digits with spaces, dots, dashes or parentheses, an optional leading +.
PHONE = re.compile(r"(?<![\w-])\+?\(?\d[\d ().-]{6,}\d(?![\w-])")
MIN_PHONE_DIGITS = 9

EMAIL_MARK = "[email]"
CARD_MARK = "[card]"
PHONE_MARK = "[phone]"


def _phone(match: re.Match[str]) -> str:
    text = match.group(0)
    return PHONE_MARK if sum(c.isdigit() for c in text) >= MIN_PHONE_DIGITS else text


def redact(text: str) -> str:
    """``text`` with e-mail addresses, card numbers and phone numbers replaced."""
    if not text:
        return text
    text = EMAIL.sub(EMAIL_MARK, text)
    text = CARD.sub(CARD_MARK, text)
    return PHONE.sub(_phone, text)


def redact_value(value: Any) -> Any:
    """Strings redacted inside any JSON-like value (dicts, lists, tuples)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return (
            type(value)(redact_value(v) for v in value)
            if isinstance(value, tuple)
            else [redact_value(v) for v in value]
        )
    return value
