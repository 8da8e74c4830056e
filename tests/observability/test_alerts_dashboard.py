"""The alert rules pass `promtool check rules` and their unit tests (cases that fire and
cases that stay quiet); the PrometheusRule carries the same groups; every dashboard query
uses only metric names the services (and the replay) export; engine stats from vLLM's stat
logger land in the registry under both names."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from services.inference.engine_stats import EngineStats
from services.inference.results import Metrics
from services.orchestrator.metrics import OrchestratorMetrics
from services.orchestrator.replay.export import report_registry
from services.orchestrator.replay.runner import ReplayReport
from services.orchestrator.replay.scoring import Score
from services.tools.executor import ToolMetrics
from shared.metrics import RpcMetrics

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "agentmesh-rules.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "agentmesh-rules.test.yaml"
PROMETHEUS_RULE = REPO / "deploy" / "k8s" / "prometheusrule.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "agentmesh-dashboard.json"
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "le", "inf", "nan",
}  # fmt: skip


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install -y prometheus (see .ci/run)"
    return found


async def _run(*args: str, stdin: bytes | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin)
    return proc.returncode or 0, out.decode()


async def test_rules_check_and_unit_tests_pass() -> None:
    code, out = await _run(promtool(), "check", "rules", str(RULES))
    assert code == 0, out
    code, out = await _run(promtool(), "test", "rules", str(RULE_TESTS))
    assert code == 0, out
    assert "SUCCESS" in out


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {
        "AgentmeshTurnP95Slow",
        "AgentmeshToolSelectionF1Low",
        "AgentmeshActiveSessionsPerCardHigh",
        "AgentmeshHeavyFallbackHigh",
        "AgentmeshKvCacheStarved",
        "AgentmeshEngineQueueing",
    } <= alerts
    cases = [
        c
        for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for c in t.get("alert_rule_test", [])
    ]
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert alerts == fired
    assert alerts == quiet


def test_prometheus_rule_carries_the_same_groups() -> None:
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def exported_names() -> set[str]:
    """Every sample name the services' registries (and the replay's) can expose."""
    registry = CollectorRegistry()
    OrchestratorMetrics(registry)
    Metrics(registry)
    EngineStats(registry)
    ToolMetrics(tools := CollectorRegistry())
    RpcMetrics(rpc := CollectorRegistry())
    replay = report_registry(ReplayReport(lane="workhorse", score=Score(), turns=[]), "gold")
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    names: set[str] = set()
    for reg in (registry, tools, rpc, replay):
        for family in reg.collect():
            names.add(family.name)
            names.update(family.name + s for s in suffixes.get(family.type, []))
    return names


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_dashboard_queries_use_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]
    assert len(exprs) >= 20
    used = set().union(*(metric_names(e) for e in exprs))
    assert used <= exported_names(), sorted(used - exported_names())
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for section in ("trigger", "stage", "lanes", "tools", "capacity"):
        assert section in titles
    # The four triggers are on it.
    for name in (
        "agentmesh_turn_seconds_bucket",
        "agentmesh_replay_tool_selection_f1",
        "agentmesh_active_sessions",
        "agentmesh_turn_heavy_fallbacks_total",
    ):
        assert name in used


def test_metric_name_extraction() -> None:
    assert metric_names(
        'sum by (le, lane) (rate(agentmesh_x_bucket{status!="ok"}[5m])) / clamp_min(vllm:y, 1)'
    ) == {"agentmesh_x_bucket", "vllm:y"}


async def test_vllm_stat_logger_feeds_both_names() -> None:
    from vllm.v1.metrics.loggers import StatLoggerBase
    from vllm.v1.metrics.stats import PrefixCacheStats, SchedulerStats

    registry = CollectorRegistry()
    stats = EngineStats(registry)
    factory = stats.logger_factory("smollm2", "engine-0", "cpu")
    logger = factory(type("Config", (), {"parallel_config": None})(), 0)
    assert isinstance(logger, StatLoggerBase)
    logger.log_engine_initialized()
    logger.record(
        SchedulerStats(
            num_running_reqs=3,
            num_waiting_reqs=2,
            kv_cache_usage=0.25,
            prefix_cache_stats=PrefixCacheStats(requests=1, queries=100, hits=40),
        ),
        None,
    )
    labels = {"model_name": "smollm2", "engine": "engine-0"}
    value = registry.get_sample_value
    assert value("vllm:num_requests_running", labels) == 3
    assert value("agentmesh_engine_requests_running", labels) == 3
    assert value("vllm:num_requests_waiting", labels) == 2
    assert value("vllm:kv_cache_usage_perc", labels) == 0.25
    assert value("agentmesh_engine_kv_cache_usage_ratio", labels) == 0.25
    assert value("vllm:prefix_cache_hits_total", labels) == 40
    assert value("agentmesh_engine_prefix_cache_hit_ratio", labels) == 0.4
    assert value("agentmesh_engine_devices", {**labels, "device": "cpu"}) == 1
    # promtool's only objection is the colon the model-server protocol's names carry
    # (vLLM's own /metrics draws the same); nothing else in the exposition.
    code, out = await _run(promtool(), "check", "metrics", stdin=generate_latest(registry))
    complaints = {line.split(" ", 1)[1] for line in out.splitlines() if line.strip()}
    assert code != 0 and complaints == {"metric names should not contain ':'"}
