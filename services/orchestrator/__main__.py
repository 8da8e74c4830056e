"""``python -m services.orchestrator``: the orchestrator on its configured port."""

from __future__ import annotations

from services.orchestrator.config import OrchestratorSettings
from services.orchestrator.service import OrchestratorService
from shared.config import load_settings
from shared.server import run_service


def main() -> int:
    settings = load_settings(OrchestratorSettings, "orchestrator")
    return run_service(OrchestratorService(settings), settings)


if __name__ == "__main__":
    raise SystemExit(main())
