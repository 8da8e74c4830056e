"""``python -m services.inference``: the inference service on its configured port."""

from __future__ import annotations

from services.inference.config import InferenceSettings
from services.inference.service import InferenceService, detect_device
from shared.config import load_settings
from shared.server import run_service


def main() -> int:
    settings = load_settings(InferenceSettings, "inference")
    return run_service(InferenceService(settings, device=detect_device()), settings)


if __name__ == "__main__":  # vLLM spawns its engine-core process: keep the guard
    raise SystemExit(main())
