"""Typed configuration. The only module that reads the environment.

Precedence (lowest first): field defaults < YAML config file < environment variables <
explicit keyword overrides (tests). One YAML file can hold every service: each service
reads its own top-level section (``inference:``, ``tools:``, ``orchestrator:``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from shared.cpu_affinity import parse_id_list
from shared.telemetry import TelemetrySettings

DEFAULT_DATA_DIR = Path("var")


class BootstrapSettings(BaseSettings):
    """Where the config file is; read before anything else."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_", extra="ignore")

    config: Path | None = None
    data_dir: Path = DEFAULT_DATA_DIR


class TlsSettings(BaseModel):
    """A server's TLS identity. With ``ca_file`` set, clients must present a certificate
    signed by that CA (mutual TLS); ``require_client_cert`` false only makes it optional."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = True


class ClientTlsSettings(BaseModel):
    """How a client verifies a server (``ca_file``) and proves itself (cert + key)."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    # The name the server's certificate must carry, when the target address is not that
    # name (an IP, a node port). None: the target's host.
    server_name: str | None = None


class StaticKey(BaseModel):
    """A long-lived bearer token, stored only as the hex SHA-256 of the token."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: list[str] = Field(default_factory=list)


class AuthSettings(BaseModel):
    """Who may call: static keys and/or JWTs signed by a key of ``jwks_file``.

    Auth is on as soon as a key, a JWKS file or the legacy ``auth_token`` is configured.
    """

    model_config = ConfigDict(extra="forbid")

    static_keys: list[StaticKey] = Field(default_factory=list)
    jwks_file: Path | None = None
    # Checked when set (the `iss` / `aud` claims).
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    # Claim holding the scopes: a space-separated string ("scope") or a list ("scp").
    jwt_scope_claim: str = "scope"
    # Claim naming the principal.
    jwt_subject_claim: str = "sub"
    jwt_algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    jwt_leeway_s: float = Field(default=30.0, ge=0)
    # Scope each service's RPCs need (by full service name). A service not listed needs an
    # authenticated caller with the `default_scope` (None: any authenticated caller).
    service_scopes: dict[str, str] = Field(
        default_factory=lambda: {
            "agentmesh.orchestrator.v1.AgentService": "agent:run",
            "agentmesh.inference.v1.InferenceService": "inference:call",
            "agentmesh.tools.v1.ToolService": "tools:call",
        }
    )
    default_scope: str | None = None
    # Probes call health without a token; reflection (service listing) needs one unless set.
    health_exempt: bool = True
    reflection_exempt: bool = False


class RequestLimits(BaseModel):
    """Bounds on what one request may carry, checked before it is parsed (bytes) or used."""

    model_config = ConfigDict(extra="forbid")

    # Serialized request size of any RPC of the service, and per method ("Method" or
    # "pkg.Service/Method") where it differs. Above ServiceSettings.max_message_bytes the
    # transport itself refuses (RESOURCE_EXHAUSTED) before any of our code runs.
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    method_max_request_bytes: dict[str, int] = Field(default_factory=dict)

    def request_bytes_limit(self, full_method: str) -> int:
        """The limit of ``/pkg.Service/Method``."""
        service_method = full_method.lstrip("/")
        method = service_method.rsplit("/", 1)[-1]
        by_method = self.method_max_request_bytes
        return by_method.get(service_method, by_method.get(method, self.max_request_bytes))


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
    # Legacy single bearer token: a static key named "default" holding every scope.
    auth_token: SecretStr | None = None
    auth: AuthSettings = Field(default_factory=AuthSettings)
    # Server certificate and key (and the clients' CA for mutual TLS). None: plaintext, which
    # is allowed on a loopback host only, unless allow_plaintext is true.
    tls: TlsSettings | None = None
    allow_plaintext: bool = False
    data_dir: Path = DEFAULT_DATA_DIR
    # Transport-level cap of any message (grpc core: RESOURCE_EXHAUSTED above it).
    max_message_bytes: int = 16 * 1024 * 1024
    limits: RequestLimits = Field(default_factory=RequestLimits)
    # OpenTelemetry traces (exporter none by default; see shared/telemetry.py).
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    # The CPU cores every thread of this process runs on, in vLLM's core-list syntax ("1",
    # "2-3,6"), pinned by the bootstrap before the event loop starts; empty: left to the OS.
    # `agentmesh up` sets it for tools and orchestrator on a CPU engine's machine (the cores
    # off the engine's OpenMP team) unless it is set.
    cpu_affinity: str = ""
    # Words a service accepts for cpu_affinity besides a core list (the inference service's
    # "auto"); the service applies them itself.
    cpu_affinity_keywords: ClassVar[frozenset[str]] = frozenset()

    @field_validator("cpu_affinity")
    @classmethod
    def _core_list(cls, value: str) -> str:
        value = value.strip()
        if value and value.lower() not in cls.cpu_affinity_keywords:
            try:
                parse_id_list(value)
            except ValueError:
                raise ValueError(
                    f"cpu_affinity {value!r} is not a core list such as 1 or 2-3,6"
                ) from None
        return value

    def pinned_cores(self) -> list[int] | None:
        """The cores the bootstrap pins this process to; None: leave it (empty, or a keyword
        the service applies itself)."""
        value = self.cpu_affinity
        if not value or value.lower() in self.cpu_affinity_keywords:
            return None
        return parse_id_list(value)


class ClientSettings(BaseModel):
    """How a service reaches another one."""

    target: str
    # Subtracted from the caller's remaining time before a call goes downstream.
    deadline_margin_s: float = Field(default=0.05, ge=0.0)
    # Sent as `authorization: Bearer <token>` on every call.
    auth_token: SecretStr | None = None
    # None: plaintext, allowed to a loopback target only, unless allow_plaintext is true.
    tls: ClientTlsSettings | None = None
    allow_plaintext: bool = False


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
