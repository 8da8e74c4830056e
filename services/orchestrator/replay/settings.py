"""Settings of ``agentmesh replay`` (section ``replay:``, env prefix ``AGENTMESH_REPLAY_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class ReplaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTMESH_REPLAY_", extra="ignore")

    # The inference service the candidate lane is served by.
    inference_target: str = "127.0.0.1:50052"
    # Where the alert reads the F1: a node-exporter textfile-collector file ...
    textfile_path: Path | None = None
    # ... or a Prometheus Pushgateway (e.g. http://pushgateway:9091).
    pushgateway_url: str | None = None
    # The gold_set label of the exported series.
    gold_set: str = "gold"
    # Seconds one replayed turn may take (the CPU embedded lane needs minutes, not seconds).
    turn_budget_s: float = 600.0
