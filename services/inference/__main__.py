"""``python -m services.inference``: the inference service on its configured port."""

from __future__ import annotations

import logging
import os
import signal

from services.inference.config import InferenceSettings
from services.inference.machine import detect_device
from services.inference.service import InferenceService
from shared.config import load_settings
from shared.server import run_service

# The exit status after an engine died: the process supervisor (kubelet, `agentmesh up`)
# restarts the service, which starts a fresh engine.
ENGINE_DIED_EXIT = 3


class EngineDeathExit:
    """On an engine's death: remember it and stop the process (health is already
    NOT_SERVING); :func:`main` then exits with :data:`ENGINE_DIED_EXIT`."""

    def __init__(self) -> None:
        self.dead: list[str] = []

    def __call__(self, engine_id: str) -> None:
        logging.getLogger("services.inference").critical(
            "%s died: stopping the service so that its supervisor restarts it", engine_id
        )
        self.dead.append(engine_id)
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    settings = load_settings(InferenceSettings, "inference")
    on_death = EngineDeathExit()
    service = InferenceService(settings, device=detect_device(), on_engine_death=on_death)
    code = run_service(service, settings)
    return ENGINE_DIED_EXIT if on_death.dead else code


if __name__ == "__main__":  # vLLM spawns its engine-core process: keep the guard
    raise SystemExit(main())
