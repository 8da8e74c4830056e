"""Bounds on AgentService requests, checked by the request guard before a handler runs."""

from __future__ import annotations

from agentmesh.orchestrator.v1 import orchestrator_pb2 as pb

from services.orchestrator.access import check_metadata_keys
from services.orchestrator.agent import MAX_SESSION_ID_CHARS
from services.orchestrator.config import OrchestratorLimits
from shared.guard import RequestChecks
from shared.limits import check_chars, check_count

SERVICE = "/agentmesh.orchestrator.v1.AgentService/"


def orchestrator_request_checks(lim: OrchestratorLimits) -> RequestChecks:
    def create_session(request: pb.CreateSessionRequest) -> None:
        check_chars(request.session_id, "session_id", MAX_SESSION_ID_CHARS)
        check_chars(request.customer_id, "customer_id", lim.max_customer_id_chars)
        check_count(request.metadata, "metadata", lim.max_metadata_entries)
        for key, value in request.metadata.items():
            check_chars(key, "metadata", lim.max_metadata_key_chars)
            check_chars(value, f"metadata[{key}]", lim.max_metadata_value_chars)
        check_metadata_keys(request.metadata)

    def by_session(request: pb.GetSessionRequest | pb.EndSessionRequest) -> None:
        check_chars(request.session_id, "session_id", MAX_SESSION_ID_CHARS)

    def run_turn(request: pb.RunTurnRequest) -> None:
        check_chars(request.session_id, "session_id", MAX_SESSION_ID_CHARS)
        check_chars(request.user_message, "user_message", lim.max_user_message_chars)
        check_chars(request.lane, "lane", lim.max_lane_chars)
        check_chars(request.confirm_action_id, "confirm_action_id", lim.max_action_id_chars)
        check_chars(request.reject_action_id, "reject_action_id", lim.max_action_id_chars)

    return {
        SERVICE + "CreateSession": create_session,
        SERVICE + "GetSession": by_session,
        SERVICE + "EndSession": by_session,
        SERVICE + "RunTurn": run_turn,
    }
