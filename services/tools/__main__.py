"""``python -m services.tools``: the tool service on its configured port."""

from __future__ import annotations

from services.tools.config import ToolsSettings, enforce_offline_models
from services.tools.service import ToolsService
from shared.config import load_settings
from shared.server import run_service


def main() -> int:
    enforce_offline_models()
    settings = load_settings(ToolsSettings, "tools")
    return run_service(ToolsService(settings), settings)


if __name__ == "__main__":
    raise SystemExit(main())
