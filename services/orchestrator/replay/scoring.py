"""Tool-selection scores: precision, recall and F1 by tool name and by name + arguments,
and abstention accuracy on the turns that need no tool.

Both F1s match calls as multisets, order-free (BFCL's parallel category): an expected call
and a made call pair up at most once, and the pairing is a maximum bipartite matching, so
the order calls were made in never matters. By name, a pair needs the same name; by
arguments, also every argument the expectation names, with values normalised (strings
case- and whitespace-folded, numbers compared as numbers, "19.00" == 19). Arguments the
expectation does not name (principal-bound ones, optional extras) are not scored.

Precision, recall and F1 are micro-averaged over the turns that need tools. A turn that
needs none has no F1 (nothing to recall): it is scored apart, as abstention (right when no
call was made), and its calls do not enter the F1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.orchestrator.replay.records import ExpectedCall


@dataclass(frozen=True)
class MadeCall:
    name: str
    arguments: Mapping[str, Any]


def normalise(value: Any) -> Any:
    """A comparable form of an argument value."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return round(float(value), 6)
    if isinstance(value, str):
        text = re.sub(r"\s+", " ", value.strip().lower())
        try:
            return round(float(text), 6)
        except ValueError:
            return text
    if isinstance(value, Mapping):
        return {str(k): normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalise(v) for v in value]
    return value


def arguments_match(expected: Mapping[str, Any] | None, made: Mapping[str, Any]) -> bool:
    if expected is None:
        return True
    return all(k in made and normalise(made[k]) == normalise(v) for k, v in expected.items())


def max_matching(
    expected: Sequence[ExpectedCall],
    made: Sequence[MadeCall],
    pairs: Callable[[ExpectedCall, MadeCall], bool],
) -> int:
    """Size of a maximum matching between expected and made calls (augmenting paths)."""
    owner: dict[int, int] = {}  # made index -> expected index

    def augment(i: int, seen: set[int]) -> bool:
        for j, call in enumerate(made):
            if j in seen or not pairs(expected[i], call):
                continue
            seen.add(j)
            if j not in owner or augment(owner[j], seen):
                owner[j] = i
                return True
        return False

    return sum(augment(i, set()) for i in range(len(expected)))


def by_name(e: ExpectedCall, m: MadeCall) -> bool:
    return e.name == m.name


def by_arguments(e: ExpectedCall, m: MadeCall) -> bool:
    return e.name == m.name and arguments_match(e.arguments, m.arguments)


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def row(self) -> dict[str, float | int]:
        return {
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
        }


class Score:
    """Accumulates turns; ``add`` returns the turn's (name matches, argument matches)."""

    def __init__(self) -> None:
        self.name = Counts()
        self.arguments = Counts()
        self.abstain_right = 0
        self.abstain_total = 0
        self.tool_turns = 0

    def add(self, expected: Sequence[ExpectedCall], made: Sequence[MadeCall]) -> tuple[int, int]:
        if not expected:
            self.abstain_total += 1
            self.abstain_right += int(not made)
            return 0, 0
        self.tool_turns += 1
        hits = []
        for counts, pairs in ((self.name, by_name), (self.arguments, by_arguments)):
            tp = max_matching(expected, made, pairs)
            counts.tp += tp
            counts.fp += len(made) - tp
            counts.fn += len(expected) - tp
            hits.append(tp)
        return hits[0], hits[1]

    def add_names(self, expected: Sequence[str], chosen: Sequence[str]) -> None:
        """Tool names only (the plan stage's choice)."""
        self.add([ExpectedCall(n) for n in expected], [MadeCall(n, {}) for n in chosen])

    @property
    def f1(self) -> float:
        return self.name.f1

    @property
    def abstention(self) -> float:
        return self.abstain_right / self.abstain_total if self.abstain_total else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "by_name": self.name.row(),
            "by_name_and_arguments": self.arguments.row(),
            "tool_turns": self.tool_turns,
            "abstention_accuracy": round(self.abstention, 4),
            "no_tool_turns": self.abstain_total,
        }
