"""Typed settings of the lane directory (``OrchestratorSettings.topology``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

DNS_PREFIX = "dns:///"


class TopologySettings(BaseModel):
    """Which inference endpoints serve each lane.

    ``lanes`` maps a lane name to its pool: ``host:port`` entries (local runs, fixed
    replicas) and/or ``dns:///name:port`` entries (a Kubernetes headless Service: every A
    record is one replica, re-resolved every ``refresh_s``). Empty: the orchestrator sends
    everything to ``inference.target`` as before (one deployment hosts every lane).
    """

    model_config = ConfigDict(extra="forbid")

    lanes: dict[str, list[str]] = Field(default_factory=dict)
    # DNS re-resolution and ListLanes verification period.
    refresh_s: float = Field(default=10.0, gt=0)
    # A replica that refused a call (UNAVAILABLE) is skipped this long before it is retried
    # (the next refresh brings it back earlier when ListLanes answers again).
    dead_retry_s: float = Field(default=5.0, gt=0)
    # A replica whose in-flight count (its ListLanes answer + this orchestrator's calls since)
    # reaches this fraction of the lane's max_concurrency is skipped while another has room.
    overload_fraction: float = Field(default=1.0, gt=0, le=1.0)

    @field_validator("lanes")
    @classmethod
    def _targets(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for lane, targets in value.items():
            if not targets:
                raise ValueError(f"lane {lane!r} has an empty pool")
            for target in targets:
                hostport = target.removeprefix(DNS_PREFIX)
                host, _, port = hostport.rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(
                        f"lane {lane!r}: target {target!r} is not host:port or dns:///host:port"
                    )
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.lanes)
