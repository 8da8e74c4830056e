"""Typed settings of the orchestrator (env prefix ``AGENTMESH_ORCHESTRATOR_``).

Budget defaults are the seed's (5 tool calls per turn, 25 per task, 5 s per turn, 25 s per
task) — right for a GPU workhorse at ~135 tokens/s. On a 2-core CPU running the 135M embedded
model (~10 tokens/s) one turn (plan + 3 parallel calls + compose) takes tens of seconds, so the
embedded preset raises ``caps.turn_budget_s`` / ``caps.task_budget_s`` and lowers the token
limits: ``config/embedded.yaml`` (what ``make run`` starts) carries those values.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.orchestrator.loop.policy import AgentProfile, Caps, Ceilings
from services.orchestrator.topology.settings import TopologySettings
from shared.config import ClientSettings, RequestLimits, ServiceSettings


class OrchestratorLimits(RequestLimits):
    """What one AgentService request may carry."""

    max_request_bytes: int = Field(default=256 * 1024, ge=1024)
    max_user_message_chars: int = Field(default=16_000, ge=1)
    max_metadata_entries: int = Field(default=32, ge=0)
    max_metadata_key_chars: int = Field(default=64, ge=1)
    max_metadata_value_chars: int = Field(default=1024, ge=1)
    max_customer_id_chars: int = Field(default=128, ge=1)
    max_lane_chars: int = Field(default=64, ge=1)
    max_action_id_chars: int = Field(default=128, ge=1)


class OrchestratorSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="AGENTMESH_ORCHESTRATOR_", env_nested_delimiter="__", extra="ignore"
    )

    port: int = 50051
    metrics_port: int = 9101

    inference: ClientSettings = Field(
        default_factory=lambda: ClientSettings(target="127.0.0.1:50052")
    )
    tools: ClientSettings = Field(default_factory=lambda: ClientSettings(target="127.0.0.1:50053"))
    # Lanes across deployments: lane -> pool of inference targets (empty: every lane at
    # `inference.target`). Each endpoint's channel takes `inference`'s other settings.
    topology: TopologySettings = Field(default_factory=TopologySettings)

    # sqlite+aiosqlite:///path (embedded default: under data_dir), postgresql+asyncpg://...
    # or redis://host:port/db for several replicas.
    session_store_url: str | None = None
    # Table / key prefix, so several deployments can share one database.
    session_store_prefix: str = "agentmesh_"

    # Defaults of every new session; CreateSession may override any field up to `ceilings`.
    caps: Caps = Field(default_factory=Caps)
    # CreateSession.budget above `caps` needs the agent:admin scope (when auth is on) and
    # never goes above `ceilings.caps`; RunTurn.lane only among `ceilings.forceable_lanes`.
    ceilings: Ceilings = Field(default_factory=Ceilings)
    # The seed's customer-success agent: the plan picks the tools, the reference reads
    # (crm_lookup, kb_search, billing_lookup) are its default.
    profile: AgentProfile = Field(default_factory=AgentProfile)
    limits: OrchestratorLimits = Field(default_factory=OrchestratorLimits)

    # A turn's lease in the store lives this long past its holder's last heartbeat (one every
    # third of it): a dead replica's session is free again within seconds.
    lease_ttl_s: float = Field(default=10.0, gt=0)
    # A turn loads at most this many of the session's newest messages from the store (the
    # prompt budgeter trims further, in tokens); GetSession returns the whole conversation.
    history_window_messages: int = Field(default=200, ge=1)
    # Warm-up waits this long for the inference and tools services to report SERVING.
    dependency_wait_s: float = Field(default=600.0, gt=0)
    # Opt-in: every finished turn appended here as a redacted JSON-lines turn record (what
    # `agentmesh replay` re-runs). Unset: nothing is recorded.
    record_turns_path: Path | None = None
    # A session counts as active this long after its last turn (agentmesh_active_sessions).
    active_session_window_s: float = Field(default=300.0, gt=0)

    def resolved_store_url(self) -> str:
        if self.session_store_url:
            return self.session_store_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'orchestrator.sqlite').resolve()}"
