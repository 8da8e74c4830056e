"""The per-device memory plan: the arithmetic, written out, for the shipped rtx4090 layouts
and the ones that cannot work (a 70B AWQ lane on one 24 GB card, two 0.92 engines on one
card)."""

from __future__ import annotations

import pytest
import yaml

from services.inference.config import PRESETS_DIR, InferenceSettings, LanesConfig
from services.inference.memory_plan import (
    GIB,
    DeviceSpec,
    MemoryPlanError,
    ModelShape,
    kv_bytes_per_token,
    plan_lane,
    weights_bytes,
)

RTX4090 = DeviceSpec(product="NVIDIA-GeForce-RTX-4090", memory_gib=23.99)
LLAMA_70B = ModelShape(
    params_b=70.55, unquantized_params_b=2.101, layers=80, kv_heads=8, head_dim=128
)
QWEN_14B = ModelShape(
    params_b=14.77, unquantized_params_b=1.557, layers=48, kv_heads=8, head_dim=128
)
HEAVY_ARGS = {
    "quantization": "awq_marlin",
    "kv_cache_dtype": "fp8",
    "max_model_len": 8192,
    "max_num_seqs": 8,
    "gpu_memory_utilization": 0.95,
}


def raw_preset() -> dict[str, object]:
    raw = yaml.safe_load((PRESETS_DIR / "rtx4090.yaml").read_text())
    assert isinstance(raw, dict)
    return raw


def test_weights_by_quantisation_from_parameter_counts() -> None:
    # int4 AWQ: 68.449B quantised params x 0.5 byte x 1.04 (group scales) = 35.59 GB,
    # + 2.101B embedding/lm-head params x 2 bytes = 4.20 GB -> 39.80 GB = 37.06 GiB.
    assert weights_bytes(LLAMA_70B, "awq_marlin") == pytest.approx(
        68.449e9 * 0.5 * 1.04 + 2.101e9 * 2
    )
    assert weights_bytes(LLAMA_70B, "awq_marlin") / GIB == pytest.approx(37.06, abs=0.01)
    # No quantisation: every parameter in bf16.
    assert weights_bytes(QWEN_14B, None) == pytest.approx(14.77e9 * 2)


def test_kv_bytes_per_token_is_layers_heads_dim_dtype_times_two() -> None:
    # 80 layers x 8 KV heads x 128 x 1 byte (fp8) x 2 (K and V) = 163,840 bytes a token;
    # tensor parallel 2 halves the KV heads per card.
    assert kv_bytes_per_token(LLAMA_70B, "fp8", 1) == 80 * 8 * 128 * 1 * 2 == 163_840
    assert kv_bytes_per_token(LLAMA_70B, "fp8", 2) == 81_920
    assert kv_bytes_per_token(QWEN_14B, "auto", 1) == 48 * 8 * 128 * 2 * 2


def test_kv_is_sized_for_max_num_seqs_at_the_planned_fill_and_at_least_one_window() -> None:
    # 14B workhorse: 16384 x 32 seqs x 1/16 fill = 32768 tokens x 96 KiB = 3.00 GiB.
    args = {
        "quantization": "awq_marlin",
        "kv_cache_dtype": "fp8",
        "max_model_len": 16384,
        "max_num_seqs": 32,
        "gpu_memory_utilization": 0.92,
    }
    plan = plan_lane("workhorse", QWEN_14B, args, RTX4090)
    assert plan.kv_tokens == 16384 * 32 // 16 == 32768
    assert plan.kv_gib == pytest.approx(32768 * 98_304 / GIB) == 3.0
    assert plan.weights_gib == pytest.approx(9.30, abs=0.01)
    assert plan.budget_gib == pytest.approx(0.92 * 23.99)
    assert plan.need_gib == pytest.approx(9.30 + 3.00 + 1.5, abs=0.01)
    assert plan.fits
    # 8 seqs x 1/16 is half a window: vLLM still needs one full sequence to start.
    heavy = plan_lane("heavy", LLAMA_70B, HEAVY_ARGS, RTX4090)
    assert heavy.kv_tokens == 8192


def test_a_70b_awq_lane_on_one_24gb_card_is_refused_with_the_numbers() -> None:
    plan = plan_lane("heavy", LLAMA_70B, HEAVY_ARGS, RTX4090)
    # 37.06 GiB weights + 1.25 GiB KV + 1.5 GiB activations = 39.81 GiB vs 0.95 x 23.99.
    assert plan.need_gib == pytest.approx(39.81, abs=0.01)
    assert plan.budget_gib == pytest.approx(22.79, abs=0.01)
    assert not plan.fits
    raw = raw_preset()
    heavy = raw["lanes"]["heavy"]  # type: ignore[index]
    del heavy["engine_args"]["tensor_parallel_size"]
    with pytest.raises(ValueError, match="memory plan refused") as refused:
        LanesConfig.model_validate({**raw, "hosted_lanes": ["heavy"]})
    assert (
        "deployment heavy: lane heavy: weights 37.06 GiB + KV 1.25 GiB (8192 tokens) + "
        "activations 1.50 GiB = 39.81 GiB per GPU (tp=1) vs budget 22.79 GiB "
        "(gpu_memory_utilization 0.95) does not fit"
    ) in str(refused.value)


def test_the_70b_lane_fits_on_two_cards_with_tensor_parallel_2() -> None:
    plan = plan_lane("heavy", LLAMA_70B, {**HEAVY_ARGS, "tensor_parallel_size": 2}, RTX4090)
    # Per card: 18.53 GiB weights + 0.62 GiB KV (half the heads) + 1.5 = 20.66 of 22.79.
    assert plan.weights_gib == pytest.approx(18.53, abs=0.01)
    assert plan.kv_gib == pytest.approx(0.625)
    assert plan.fits


def test_cpu_offload_moves_weights_off_the_card() -> None:
    plan = plan_lane("heavy", LLAMA_70B, {**HEAVY_ARGS, "cpu_offload_gb": 20}, RTX4090)
    assert plan.weights_gib == pytest.approx(37.06 - 20e9 / GIB, abs=0.01)
    assert plan.fits


@pytest.mark.parametrize("hosted", [["workhorse"], ["planner"], ["heavy"], ["speed"]])
def test_the_shipped_rtx4090_layouts_are_accepted(hosted: list[str]) -> None:
    config = InferenceSettings(preset="rtx4090", hosted_lanes=hosted).load_lanes()
    assert config.hosted_lanes == hosted
    assert config.deployments == {
        "workhorse": ["workhorse"],
        "planner": ["planner"],
        "heavy": ["heavy"],
        "speed": ["speed"],
    }
    for lane in config.lanes.values():
        assert lane.engine_args["quantization"] in ("awq_marlin", "fp8")


def test_workhorse_and_speed_on_one_card_only_at_split_utilisation() -> None:
    with pytest.raises(ValueError, match=r"claim workhorse 0.92 \+ speed 0.92 = 1.84"):
        InferenceSettings(preset="rtx4090", hosted_lanes=["workhorse", "speed"]).load_lanes()
    raw = raw_preset()
    lanes = raw["lanes"]  # type: ignore[index]
    for name, share in (("workhorse", 0.50), ("speed", 0.46)):
        lanes[name]["engine_args"].update(
            max_model_len=8192, max_num_seqs=16, gpu_memory_utilization=share
        )
    # workhorse 9.30 + 0.75 + 1.5 = 11.55 of 12.00 GiB; speed 8.46 + 0.50 + 1.5 = 10.46 of
    # 11.04 GiB; together 0.96 of the card.
    both = ["workhorse", "speed"]
    config = LanesConfig.model_validate(
        {**raw, "deployments": {"node": both}, "hosted_lanes": both}
    )
    assert config.hosted_lanes == both


def test_the_plan_error_is_a_value_error_pydantic_reports() -> None:
    assert issubclass(MemoryPlanError, ValueError)


def test_a_gpu_preset_lane_without_a_shape_is_refused() -> None:
    raw = raw_preset()
    del raw["lanes"]["planner"]["memory"]  # type: ignore[index]
    with pytest.raises(ValueError, match="lane planner has no `memory` shape"):
        LanesConfig.model_validate(raw)


def test_the_embedded_preset_has_no_device_plan() -> None:
    config = InferenceSettings(preset="embedded").load_lanes()
    assert config.device is None
