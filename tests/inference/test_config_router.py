"""Lane presets and the router (no engine)."""

from __future__ import annotations

import pytest

from services.inference.config import InferenceSettings, StageName, ToolCallFormat
from services.inference.router import LaneRouter
from shared.errors import NotFound


def _settings(**kw: object) -> InferenceSettings:
    return InferenceSettings(**kw)  # type: ignore[arg-type]


def test_embedded_preset_has_four_lanes_on_one_engine() -> None:
    config = _settings(preset="embedded").load_lanes()
    assert config.preset == "embedded"
    assert config.hosted_lanes == ["workhorse", "planner", "heavy", "speed"]
    assert {lane.model for lane in config.hosted()} == {"embedded:smollm2-135m-instruct"}
    assert len({lane.engine_key() for lane in config.hosted()}) == 1
    workhorse = config.lanes["workhorse"]
    assert workhorse.engine_args["enforce_eager"] is True
    assert workhorse.engine_args["enable_prefix_caching"] is True
    assert workhorse.engine_args["dtype"] == "auto"  # chosen for the machine at start
    assert workhorse.template_path().is_file()


def test_rtx4090_preset_matches_the_seed_menu() -> None:
    config = _settings(preset="rtx4090").load_lanes()
    lanes = config.lanes
    assert lanes["workhorse"].model == "Qwen/Qwen2.5-14B-Instruct-AWQ"
    args = lanes["workhorse"].engine_args
    assert args["quantization"] == "awq_marlin" and args["kv_cache_dtype"] == "fp8"
    assert all(lane.engine_args["dtype"] == "auto" for lane in lanes.values())
    assert args["max_model_len"] == 16384 and args["max_num_seqs"] == 32
    assert args["enable_chunked_prefill"] and args["enable_prefix_caching"]
    assert args["gpu_memory_utilization"] == 0.92
    assert lanes["workhorse"].tool_call_format is ToolCallFormat.HERMES
    assert "Qwen2.5-32B-Instruct-AWQ" in lanes["planner"].model
    assert "70B" in lanes["heavy"].model and "AWQ" in lanes["heavy"].model
    assert "Llama-3.1-8B-Instruct" in lanes["speed"].model
    assert lanes["speed"].engine_args["quantization"] == "fp8"
    assert lanes["speed"].tool_call_format is ToolCallFormat.LLAMA3_JSON
    # One 24 GB card: an instance hosts a subset, configurable.
    assert config.hosted_lanes == ["workhorse"]
    assert len({lane.engine_key() for lane in lanes.values()}) == 4
    other = _settings(preset="rtx4090", hosted_lanes=["speed"]).load_lanes()
    assert other.hosted_lanes == ["speed"]


def test_unknown_hosted_lane_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="unknown lanes"):
        _settings(preset="embedded", hosted_lanes=["nope"]).load_lanes()


def _router(hosted: list[str]) -> LaneRouter:
    config = _settings(preset="embedded", hosted_lanes=hosted).load_lanes()
    return LaneRouter(config.hosted(), list(config.lanes.values()))


@pytest.mark.parametrize(
    ("stage", "level", "lane"),
    [
        (StageName.TOOL_CALL, 0, "workhorse"),
        (StageName.PLAN, 1, "planner"),
        (StageName.COMPOSE, 2, "heavy"),
        (None, 0, "workhorse"),
        (StageName.COMPOSE, 7, "heavy"),
    ],
)
def test_automatic_selection_by_escalation_level(
    stage: StageName | None, level: int, lane: str
) -> None:
    choice = _router(["workhorse", "planner", "heavy", "speed"]).choose("", stage, level)
    assert choice.lane.name == lane
    assert "automatic" in choice.reason and lane in choice.reason


def test_explicit_lane_and_reason() -> None:
    choice = _router(["workhorse", "speed"]).choose("speed", StageName.PLAN, 2)
    assert choice.lane.name == "speed"
    assert "by name" in choice.reason


def test_speed_is_never_chosen_automatically() -> None:
    router = _router(["speed"])
    with pytest.raises(NotFound):
        router.choose("", StageName.TOOL_CALL, 0)


def test_fallback_to_lower_level_when_not_hosted() -> None:
    choice = _router(["workhorse", "planner"]).choose("", StageName.COMPOSE, 2)
    assert choice.lane.name == "planner"
    assert choice.reason == (
        "automatic: stage compose, escalation level 1 (planner) (level 2 clamped to 1) -> planner"
    )


def test_unknown_and_unhosted_lanes_are_not_found() -> None:
    router = _router(["workhorse"])
    with pytest.raises(NotFound) as unknown:
        router.choose("nope", None, 0)
    assert unknown.value.reason == "LANE_NOT_FOUND"
    with pytest.raises(NotFound) as elsewhere:
        router.choose("heavy", None, 0)
    assert elsewhere.value.reason == "LANE_NOT_HOSTED"
