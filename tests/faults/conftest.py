"""The fault suite's ledger: every turn and every status the fault tests saw, summed up at the
end of the run (lost turns, duplicated writes and undefined statuses must all be 0)."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import pytest

# What a caller may see when something failed: each says what happened and whether to retry.
DEFINED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


@dataclass
class Ledger:
    turns: int = 0
    lost_turns: int = 0
    duplicated_writes: int = 0
    undefined_statuses: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def status(self, code: grpc.StatusCode) -> None:
        self.statuses[code.name] = self.statuses.get(code.name, 0) + 1
        if code not in DEFINED:
            self.undefined_statuses += 1

    def turn(self, finished: bool) -> None:
        """A turn the caller ran to its end: it finished with a TurnCompleted or was lost."""
        self.turns += 1
        if not finished:
            self.lost_turns += 1

    def writes(self, keys: list[str]) -> None:
        self.duplicated_writes += len(keys) - len(set(keys))


LEDGER: pytest.StashKey[Ledger] = pytest.StashKey()


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Ledger:
    return request.config.stash.setdefault(LEDGER, Ledger())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    found = terminalreporter.config.stash.get(LEDGER, None)
    if found is None:
        return
    terminalreporter.write_sep("-", "fault suite")
    terminalreporter.write_line(
        f"turns {found.turns}, lost turns {found.lost_turns}, duplicated writes "
        f"{found.duplicated_writes}, undefined statuses {found.undefined_statuses}; "
        f"statuses seen {dict(sorted(found.statuses.items()))}"
    )
