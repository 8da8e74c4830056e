"""Who may see and steer a session.

With auth on, a session belongs to the principal that created it: its name is stored in the
session's metadata under ``agentmesh.owner`` (a reserved key no caller can set), and any other
principal gets NOT_FOUND for it, exactly as for a session that does not exist. Forcing a lane,
raising a budget above the service defaults and ending another principal's session need the
``agent:admin`` scope; no one goes above the server's ceiling. With auth off every caller may
do all of it, up to the ceiling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.orchestrator.loop.policy import Caps
from services.orchestrator.sessions.base import SessionRecord
from shared.auth import SCOPE_AGENT_ADMIN, current_principal, principal_name, require_scope
from shared.errors import InvalidArgument, NotFound

RESERVED_PREFIX = "agentmesh."
OWNER_KEY = "agentmesh.owner"


def check_metadata_keys(metadata: Mapping[str, str]) -> None:
    for key in metadata:
        if key.startswith(RESERVED_PREFIX):
            raise InvalidArgument(
                f"metadata[{key}]",
                f"keys starting with {RESERVED_PREFIX!r} are reserved for the service",
                reason="RESERVED_METADATA_KEY",
            )


def _proto_field(caps_field: str) -> str:
    return "budget." + caps_field.removesuffix("_s")


class SessionAccess:
    """The checks the AgentService servicer runs around the Agent's calls."""

    def __init__(self, default_caps: Caps, ceiling: Caps | None = None) -> None:
        self._defaults = default_caps
        self._ceiling = ceiling

    def new_session_metadata(self, metadata: Mapping[str, str]) -> dict[str, str]:
        """The caller's metadata (reserved keys refused) plus the owner."""
        check_metadata_keys(metadata)
        stamped = dict(metadata)
        owner = principal_name()
        if owner:
            stamped[OWNER_KEY] = owner
        return stamped

    def check_budget(self, overrides: Mapping[str, Any]) -> None:
        """Above the defaults needs agent:admin; above the ceiling no one may go."""
        for name, value in overrides.items():
            if not value:
                continue  # zero: the default
            default = getattr(self._defaults, name)
            top = max(getattr(self._ceiling, name), default) if self._ceiling else None
            if top is not None and value > top:
                raise InvalidArgument(
                    _proto_field(name),
                    f"{value:g} is over the server ceiling of {top:g}",
                    reason="ABOVE_CEILING",
                    metadata={"limit": f"{top:g}"},
                )
            if value > default:
                require_scope(
                    SCOPE_AGENT_ADMIN, f"raising {_proto_field(name)} above the default {default:g}"
                )

    def check_lane(self, lane: str) -> None:
        if lane:
            require_scope(SCOPE_AGENT_ADMIN, "forcing a lane")

    def check_visible(self, record: SessionRecord, *, ending: bool = False) -> None:
        """NOT_FOUND unless the caller owns the session (an admin may end any)."""
        principal = current_principal()
        if principal is None:
            return
        if ending and principal.has(SCOPE_AGENT_ADMIN):
            return
        if record.metadata.get(OWNER_KEY) != principal.name:
            raise NotFound("no such session", metadata={"session_id": record.session_id})
