"""The orchestrator's own Prometheus metrics: what the seed's scaling triggers watch (p95 turn
time, heavy-fallback rate, refusals, caps hit)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.orchestrator.loop import events as ev

TURN_BUCKETS = (0.5, 1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 60, 120, 180, 300)
STAGES = ("plan", "tool_emit", "tool_wall", "observe", "compose", "queue_prefill", "network")


class OrchestratorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
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
