"""Engine state from vLLM's own stat loggers (v1 ``StatLoggerBase``), in the service's
registry: running and waiting requests, KV-cache usage, prefix-cache hits.

Each value is exported twice: as ``agentmesh_engine_*`` and under the model-server protocol
names that Kubernetes inference schedulers read (llm-d's inference scheduler, the Gateway API
Inference Extension): ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc`` (a 0..1 fraction, as vLLM writes it), plus
``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``.

vLLM's default loggers stay off (``disable_log_stats``): AsyncLLM then runs only the logger
given here, and nothing lands in prometheus-client's global registry.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

LABELS = ["model_name", "engine"]


class EngineStats:
    """The engine gauges of one inference service, fed by :meth:`logger_factory` loggers."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: list[str] = LABELS) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self.running = gauge("agentmesh_engine_requests_running", "Requests the engine runs.")
        self.waiting = gauge("agentmesh_engine_requests_waiting", "Requests queued in the engine.")
        self.kv_usage = gauge(
            "agentmesh_engine_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)."
        )
        self.prefix_hit_ratio = gauge(
            "agentmesh_engine_prefix_cache_hit_ratio",
            "Prefix-cache hits over queried prompt tokens since the engine started.",
        )
        self.devices = gauge(
            "agentmesh_engine_devices",
            "Accelerators (or CPU sockets) one engine runs on.",
            ["model_name", "engine", "device"],
        )
        self.vllm_running = gauge("vllm:num_requests_running", "Requests running (vLLM name).")
        self.vllm_waiting = gauge("vllm:num_requests_waiting", "Requests waiting (vLLM name).")
        self.vllm_kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0..1 (vLLM name).")
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            LABELS,
            registry=registry,
        )
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            LABELS,
            registry=registry,
        )
        self._totals: dict[tuple[str, str], tuple[int, int]] = {}

    def record(
        self,
        model: str,
        engine: str,
        *,
        running: int,
        waiting: int,
        kv_usage: float,
        prefix_queries: int = 0,
        prefix_hits: int = 0,
    ) -> None:
        labels = (model, engine)
        self.running.labels(*labels).set(running)
        self.waiting.labels(*labels).set(waiting)
        self.kv_usage.labels(*labels).set(kv_usage)
        self.vllm_running.labels(*labels).set(running)
        self.vllm_waiting.labels(*labels).set(waiting)
        self.vllm_kv_usage.labels(*labels).set(kv_usage)
        if prefix_queries:
            self.prefix_queries.labels(*labels).inc(prefix_queries)
            self.prefix_hits.labels(*labels).inc(prefix_hits)
            queries, hits = self._totals.get(labels, (0, 0))
            queries, hits = queries + prefix_queries, hits + prefix_hits
            self._totals[labels] = (queries, hits)
            self.prefix_hit_ratio.labels(*labels).set(hits / queries if queries else 0.0)

    def engine_started(self, model: str, engine: str, device: str, devices: int) -> None:
        """Zeroed series from the start (a scheduler reads an idle engine as idle)."""
        self.record(model, engine, running=0, waiting=0, kv_usage=0.0)
        self.prefix_hit_ratio.labels(model, engine).set(0.0)
        self.prefix_queries.labels(model, engine)
        self.prefix_hits.labels(model, engine)
        self.devices.labels(model, engine, device).set(devices)

    def logger_factory(self, model: str, engine: str, device: str) -> Any:
        """A vLLM ``StatLoggerFactory`` (``(vllm_config, engine_index) -> StatLoggerBase``)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class AgentmeshStatLogger(StatLoggerBase):  # type: ignore[misc]
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self._devices = int(
                    getattr(getattr(vllm_config, "parallel_config", None), "world_size", 1) or 1
                )

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is None:
                    return
                prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
                stats.record(
                    model,
                    engine,
                    running=int(scheduler_stats.num_running_reqs),
                    waiting=int(scheduler_stats.num_waiting_reqs),
                    kv_usage=float(scheduler_stats.kv_cache_usage),
                    prefix_queries=int(getattr(prefix, "queries", 0) or 0),
                    prefix_hits=int(getattr(prefix, "hits", 0) or 0),
                )

            def log_engine_initialized(self) -> None:
                stats.engine_started(model, engine, device, self._devices)

        return AgentmeshStatLogger
