"""Configuration precedence: defaults < config file < environment < explicit overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import SettingsConfigDict

from shared.config import ServiceSettings, load_settings
from shared.deadlines import Deadline, downstream_timeout
from shared.errors import DeadlineExceeded


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTMESH_DEMO_", extra="ignore")
    port: int = 50999
    greeting: str = "hello"


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agentmesh.yaml"
    config.write_text("demo:\n  port: 6000\n  greeting: from-file\nother:\n  port: 1\n")
    monkeypatch.delenv("AGENTMESH_CONFIG", raising=False)
    assert load_settings(DemoSettings, "demo").port == 50999
    from_file = load_settings(DemoSettings, "demo", config_file=config)
    assert (from_file.port, from_file.greeting) == (6000, "from-file")
    monkeypatch.setenv("AGENTMESH_DEMO_PORT", "7000")
    from_env = load_settings(DemoSettings, "demo", config_file=config)
    assert (from_env.port, from_env.greeting) == (7000, "from-file")
    explicit = load_settings(DemoSettings, "demo", config_file=config, port=8000)
    assert explicit.port == 8000
    assert isinstance(explicit, DemoSettings)


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agentmesh.yaml"
    config.write_text("demo:\n  greeting: via-env-path\n")
    monkeypatch.setenv("AGENTMESH_CONFIG", str(config))
    assert load_settings(DemoSettings, "demo").greeting == "via-env-path"


def test_deadline_helper_subtracts_margin_and_refuses_when_spent() -> None:
    deadline = Deadline.after(0.5)
    timeout = downstream_timeout(0.05, deadline=deadline)
    assert timeout is not None and timeout < 0.45
    assert downstream_timeout(0.05) is None
    with pytest.raises(DeadlineExceeded):
        Deadline.after(-1).timeout()
