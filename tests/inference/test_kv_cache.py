"""The engine's KV cache size chosen for the machine: pure over (engine args, memory, model)."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest

from services.inference.config import InferenceSettings
from services.inference.kv_cache import (
    FALLBACK_BYTES,
    GIB,
    MIB,
    KvDemand,
    ModelKvShape,
    choose_kv_cache,
    kv_demand,
    kv_shape_from_config,
    read_kv_shape,
)

# SmolLM2-135M's config.json (the embedded model), trimmed to what matters.
SMOLLM2 = {
    "hidden_size": 576,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
}
SMOLLM2_SHAPE = ModelKvShape(layers=30, kv_heads=3, head_dim=64, max_len=8192)
# The embedded preset's engine arguments.
EMBEDDED = {"max_model_len": 4096, "max_num_seqs": 32, "dtype": "auto"}
# 30 layers x 3 KV heads x 64 x 2 bytes x 2 (K and V).
BF16_PER_TOKEN = 23040
EMBEDDED_FILL = 32 * 4096 * BF16_PER_TOKEN  # 2.81 GiB


def embedded_demand(dtype: str = "bfloat16") -> KvDemand:
    demand = kv_demand(EMBEDDED, SMOLLM2_SHAPE, dtype)
    assert demand is not None
    return demand


def test_the_shape_comes_from_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    assert read_kv_shape(str(tmp_path)) == SMOLLM2_SHAPE
    assert read_kv_shape(str(tmp_path / "missing")) is None
    assert read_kv_shape("Qwen/Qwen2.5-14B-Instruct-AWQ") is None  # a hub id, not a folder
    # head_dim from hidden_size / heads; KV heads default to the attention heads.
    derived = {"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32}
    assert kv_shape_from_config(derived) == ModelKvShape(32, 32, 128, None)
    assert kv_shape_from_config({"text_config": SMOLLM2, "model_type": "vl"}) == SMOLLM2_SHAPE
    assert kv_shape_from_config({"num_hidden_layers": 30}) is None


def test_demand_is_sequences_x_window_x_bytes_per_token_in_the_engines_dtype() -> None:
    bf16 = embedded_demand("bfloat16")
    assert (bf16.max_num_seqs, bf16.max_model_len, bf16.bytes_per_token) == (32, 4096, 23040)
    assert bf16.fill_bytes == EMBEDDED_FILL
    # float32 compute: the KV cache ("auto" KV dtype) is float32 too.
    assert embedded_demand("float32").bytes_per_token == 2 * BF16_PER_TOKEN
    fp8 = kv_demand({**EMBEDDED, "kv_cache_dtype": "fp8"}, SMOLLM2_SHAPE, "bfloat16")
    assert fp8 is not None and fp8.bytes_per_token == BF16_PER_TOKEN // 2
    # Unset: vLLM's defaults (128 sequences, the model's max_position_embeddings).
    bare = kv_demand({}, SMOLLM2_SHAPE, "bfloat16")
    assert bare is not None and (bare.max_num_seqs, bare.max_model_len) == (128, 8192)
    assert kv_demand(EMBEDDED, None, "bfloat16") is None


def test_lots_of_memory_gets_what_the_engine_can_fill() -> None:
    choice = choose_kv_cache("cpu", EMBEDDED, None, 64 * GIB, embedded_demand())
    assert choice.bytes == EMBEDDED_FILL
    assert choice.bytes_per_token == BF16_PER_TOKEN
    assert choice.reason == (
        "auto: what the engine can fill, 32 sequences x 4096 tokens x 23040 B = 2.81 GiB "
        "(within 40% of 64.00 GiB available)"
    )


def test_little_memory_gets_its_share_of_what_is_available() -> None:
    choice = choose_kv_cache("cpu", EMBEDDED, None, 4 * GIB, embedded_demand())
    # 40% of 4 GiB, whole MiB.
    assert choice.bytes == 1638 * MIB
    assert choice.reason == (
        "auto: 40% of 4.00 GiB available (the engine could fill 32 sequences x 4096 tokens x "
        "23040 B = 2.81 GiB)"
    )


def test_very_little_memory_still_gets_the_floor() -> None:
    choice = choose_kv_cache("cpu", EMBEDDED, None, GIB, embedded_demand())
    assert choice.bytes == GIB
    assert choice.reason.startswith("auto: 40% of 1.00 GiB available")
    assert choice.reason.endswith("raised to the floor of 1.00 GiB (1 GiB and one full sequence)")


def test_the_floor_holds_one_full_sequence() -> None:
    # A 70B-like shape: 80 layers x 8 KV heads x 128 x 2 B x 2 = 320 KiB per token.
    big = ModelKvShape(layers=80, kv_heads=8, head_dim=128)
    demand = kv_demand({"max_model_len": 32768, "max_num_seqs": 4}, big, "bfloat16")
    assert demand is not None and demand.one_sequence_bytes == 10 * GIB
    choice = choose_kv_cache("cpu", {}, None, 8 * GIB, demand)
    assert choice.bytes == 10 * GIB
    assert "raised to the floor of 10.00 GiB" in choice.reason


def test_an_explicit_setting_wins_over_auto() -> None:
    for available in (GIB, 64 * GIB, None):
        choice = choose_kv_cache("cpu", EMBEDDED, 2.0, available, embedded_demand())
        assert (choice.bytes, choice.reason) == (2 * GIB, "set by cpu_kvcache_gib (2 GiB)")
    half = choose_kv_cache("cpu", EMBEDDED, 0.5, 64 * GIB, embedded_demand())
    assert half.bytes == GIB // 2


def test_the_lane_file_wins_over_the_setting() -> None:
    args = {**EMBEDDED, "kv_cache_memory_bytes": 3 * GIB}
    choice = choose_kv_cache("cpu", args, 2.0, 64 * GIB, embedded_demand())
    assert (choice.bytes, choice.reason) == (
        3 * GIB,
        "set in the lane file (kv_cache_memory_bytes)",
    )


def test_unknowns() -> None:
    no_shape = choose_kv_cache("cpu", EMBEDDED, None, 10 * GIB, None)
    assert no_shape.bytes == 4096 * MIB and no_shape.reason == (
        "auto: 40% of 10.00 GiB available (model shape unknown)"
    )
    nothing = choose_kv_cache("cpu", EMBEDDED, None, None, None)
    assert nothing.bytes == FALLBACK_BYTES
    no_memory = choose_kv_cache("cpu", EMBEDDED, None, None, embedded_demand())
    assert no_memory.bytes == EMBEDDED_FILL
    assert no_memory.reason.startswith("auto: available memory unknown")


def test_cuda_reports_what_gpu_memory_utilization_left() -> None:
    args = {**EMBEDDED, "gpu_memory_utilization": 0.85}
    choice = choose_kv_cache("cuda", args, 2.0, None, embedded_demand())
    assert choice.bytes == 0 and choice.reason == (
        "cuda: vLLM sizes it from gpu_memory_utilization 0.85 of the card (what the weights and "
        "activations leave)"
    )
    started = choice.started(100_000)
    assert (started.tokens, started.bytes) == (100_000, 100_000 * BF16_PER_TOKEN)
    # On CPU the chosen bytes stay; the tokens are added.
    cpu = choose_kv_cache("cpu", EMBEDDED, 2.0, None, embedded_demand()).started(93_184)
    assert (cpu.bytes, cpu.tokens) == (2 * GIB, 93_184)


def test_the_setting_defaults_to_auto_and_takes_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTMESH_INFERENCE_CPU_KVCACHE_GIB", raising=False)
    assert InferenceSettings().cpu_kvcache_gib == "auto"
    assert InferenceSettings().kvcache_gib() is None
    monkeypatch.setenv("AGENTMESH_INFERENCE_CPU_KVCACHE_GIB", "2")
    assert InferenceSettings().kvcache_gib() == 2.0
    monkeypatch.setenv("AGENTMESH_INFERENCE_CPU_KVCACHE_GIB", "1.5")
    assert InferenceSettings().kvcache_gib() == 1.5
    monkeypatch.setenv("AGENTMESH_INFERENCE_CPU_KVCACHE_GIB", "auto")
    assert InferenceSettings().kvcache_gib() is None
    for bad in ("0", "-1", "lots"):
        monkeypatch.setenv("AGENTMESH_INFERENCE_CPU_KVCACHE_GIB", bad)
        with pytest.raises(pydantic.ValidationError):
            InferenceSettings()
