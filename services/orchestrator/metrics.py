"""The orchestrator's own Prometheus metrics: what the seed's scaling triggers watch (p95 turn
time, heavy-fallback rate, refusals, caps hit)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.orchestrator.loop import events as ev

TURN_BUCKETS = (0.5, 1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 60, 120, 180, 300)
STAGES = ("plan", "tool_emit", "tool_wall", "observe", "compose", "queue_prefill", "network")


class OrchestratorMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        active_window_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sessions = ActiveSessions(active_window_s, clock)
        registry.register(self.sessions)
        self.in_flight = Gauge("agentmesh_turns_in_flight", "Turns running now.", registry=registry)
        self.heavy_fallbacks = Counter(
            "agentmesh_turn_heavy_fallbacks",
            "Turns in which the failure ladder escalated to a heavier lane (the seed's "
            "heavy-fallback trigger divides this by agentmesh_turns_total).",
            registry=registry,
        )
        self.turns = Counter(
            "agentmesh_turns", "Turns finished, by outcome.", ["outcome"], registry=registry
        )
        self.turn_seconds = Histogram(
            "agentmesh_turn_seconds",
            "Wall time of whole turns.",
            buckets=TURN_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "agentmesh_turn_stage_seconds",
            "Per-turn time by stage (the latency budget table).",
            ["stage"],
            buckets=TURN_BUCKETS,
            registry=registry,
        )
        self.tool_calls = Counter(
            "agentmesh_turn_tool_calls",
            "Tool calls as the orchestrator saw them, by tool and status "
            "(REFUSED / SKIPPED_DUPLICATE included).",
            ["tool", "status"],
            registry=registry,
        )
        self.escalations = Counter(
            "agentmesh_escalations",
            "Failure-ladder steps, by kind and target lane.",
            ["kind", "to_lane"],
            registry=registry,
        )
        self.tokens = Counter(
            "agentmesh_turn_tokens",
            "Tokens used by turns, by lane and kind (prompt, cached, completion).",
            ["lane", "kind"],
            registry=registry,
        )

    def turn(self, session_id: str) -> TurnMetrics:
        """The metrics of one running turn (close it when the turn's stream ends)."""
        return TurnMetrics(self, session_id)

    def observe(self, event: ev.TurnEvent) -> None:
        if isinstance(event, ev.ToolCallFinished):
            self.tool_calls.labels(event.name, event.status).inc()
        elif isinstance(event, ev.Escalated):
            self.escalations.labels(event.kind.value, event.to_lane).inc()
        elif isinstance(event, ev.TurnCompleted):
            self.turns.labels(event.outcome.value).inc()
            self.turn_seconds.observe(event.latency.total)
            for stage in STAGES:
                self.stage_seconds.labels(stage).observe(getattr(event.latency, stage))
            for lane in event.usage:
                self.tokens.labels(lane.lane, "prompt").inc(lane.usage.prompt_tokens)
                self.tokens.labels(lane.lane, "cached").inc(lane.usage.cached_prompt_tokens)
                self.tokens.labels(lane.lane, "completion").inc(lane.usage.completion_tokens)


class TurnMetrics:
    """One turn: in flight until closed; counts a heavy fallback once."""

    def __init__(self, metrics: OrchestratorMetrics, session_id: str) -> None:
        self._m = metrics
        self._session = session_id
        self._escalated = False
        self._closed = False
        metrics.in_flight.inc()
        metrics.sessions.start(session_id)

    def observe(self, event: ev.TurnEvent) -> None:
        if isinstance(event, ev.Escalated) and event.kind is ev.EscalationKind.LANE_ESCALATION:
            self._escalated = True
        elif isinstance(event, ev.TurnCompleted) and self._escalated:
            self._m.heavy_fallbacks.inc()
        self._m.observe(event)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._m.in_flight.dec()
            self._m.sessions.finish(self._session)


class ActiveSessions(Collector):
    """``agentmesh_active_sessions``: sessions with a turn running or one that ended within
    the window (the seed's "active sessions per card" trigger), computed at scrape time."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self._window_s = window_s
        self._clock = clock
        self._running: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def start(self, session_id: str) -> None:
        self._running[session_id] = self._running.get(session_id, 0) + 1

    def finish(self, session_id: str) -> None:
        left = self._running.get(session_id, 1) - 1
        if left > 0:
            self._running[session_id] = left
        else:
            self._running.pop(session_id, None)
        self._last[session_id] = self._clock()

    def count(self) -> int:
        horizon = self._clock() - self._window_s
        for sid in [s for s, t in self._last.items() if t < horizon]:
            del self._last[sid]
        return len(set(self._running) | set(self._last))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "agentmesh_active_sessions",
            "Sessions with a turn running or finished within the activity window.",
            value=self.count(),
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("agentmesh_active_sessions", "Active sessions.")
