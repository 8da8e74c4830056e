"""Typed configuration. The only module that reads the environment.

Precedence (lowest first): field defaults < YAML config file < environment variables <
explicit keyword overrides (tests). One YAML file can hold every service: each service
reads its own top-level section (``inference:``, ``tools:``, ``orchestrator:``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from shared.telemetry import TelemetrySettings

DEFAULT_DATA_DIR = Path("var")


class BootstrapSettings(BaseSettings):
    """Where the config file is; read before anything else."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_", extra="ignore")

    config: Path | None = None
    data_dir: Path = DEFAULT_DATA_DIR


class ServiceSettings(BaseSettings):
    """What every gRPC service shares: where it listens and how it stops."""

    model_config = SettingsConfigDict(extra="ignore", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    port: int = 0
    # Prometheus /metrics over HTTP; 0 disables it.
    metrics_port: int = 0
    # Seconds in-flight calls get to finish after SIGTERM before they are cancelled.
    grace_seconds: float = 15.0
    # Seconds between health NOT_SERVING and closing the listener, so load balancers notice.
    drain_seconds: float = 0.0
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    # When set, every RPC but health and reflection needs `authorization: Bearer <token>`.
    auth_token: SecretStr | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    max_message_bytes: int = 16 * 1024 * 1024
    # OpenTelemetry traces (exporter none by default; see shared/telemetry.py).
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)


class ClientSettings(BaseModel):
    """How a service reaches another one."""

    target: str
    # Subtracted from the caller's remaining time before a call goes downstream.
    deadline_margin_s: float = Field(default=0.05, ge=0.0)
    auth_token: SecretStr | None = None


S = TypeVar("S", bound=BaseSettings)


class _YamlSection(PydanticBaseSettingsSource):
    """Settings source: one top-level section of a YAML file."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


def read_config_section(config_file: Path | None, section: str) -> dict[str, Any]:
    if config_file is None:
        return {}
    raw = yaml.safe_load(config_file.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {config_file} must hold a mapping")
    value = raw.get(section, {}) or {}
    if not isinstance(value, dict):
        raise ValueError(f"section {section!r} of {config_file} must be a mapping")
    return value


def load_settings(
    cls: type[S],
    section: str,
    config_file: Path | None = None,
    **overrides: Any,
) -> S:
    """Build ``cls`` from defaults < ``config_file[section]`` < environment < ``overrides``."""
    if config_file is None:
        boot = BootstrapSettings()
        config_file = boot.config
    file_data = read_config_section(config_file, section)

    class _Loaded(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls_inner,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _YamlSection(settings_cls, file_data))

    loaded = _Loaded(**overrides)
    return cls.model_validate(loaded.model_dump())


def child_process_environment(config_file: Path | None) -> dict[str, str]:
    """This process's environment for a child service, pointing it at ``config_file``."""
    import os

    env = dict(os.environ)
    if config_file is not None:
        env["AGENTMESH_CONFIG"] = str(config_file.resolve())
    return env
