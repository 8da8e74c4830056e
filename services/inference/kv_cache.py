"""The engine's KV cache size, chosen for the machine it starts on.

vLLM's CPU build sizes its KV cache from ``kv_cache_memory_bytes`` (its legacy
``VLLM_CPU_KVCACHE_SPACE`` variable sets the same field); without it, from
``gpu_memory_utilization`` (0.9) x the node's memory minus the worker's resident memory. Each
engine here gets ``kv_cache_memory_bytes``:

- set in the lane file (``engine_args.kv_cache_memory_bytes``, vLLM's own argument): as is;
- ``cpu_kvcache_gib`` (``AGENTMESH_INFERENCE_CPU_KVCACHE_GIB``) a number: that many GiB;
- ``auto`` (the default): what the engine can ever fill (``max_num_seqs`` x ``max_model_len``
  tokens x the model's KV bytes per token, from its config.json and the engine's dtype),
  capped at :data:`AVAILABLE_FRACTION` of the memory available at start (MemAvailable within
  the cgroup's limit), and at least 1 GiB and one full ``max_model_len`` sequence (vLLM
  refuses to start with less).

On CUDA vLLM sizes the cache from ``gpu_memory_utilization``: the choice says so, and once
the engine started it records the tokens the cache holds (and their bytes).

:func:`choose_kv_cache` is pure (facts in, choice and reason out) so each machine kind is
unit-tested; :func:`read_kv_shape` reads the model's config.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.inference.memory_plan import GIB, kv_bytes_per_token

MIB = 1024**2
AUTO = "auto"
# Share of the memory available at start the KV cache may take: the rest is the weights,
# activations, the engine's processes and whatever else runs on the machine.
AVAILABLE_FRACTION = 0.4
MIN_BYTES = GIB
# vLLM's max_num_seqs where the lane file sets none: AsyncLLM starts under
# UsageContext.ENGINE_CONTEXT, which has no CPU default of its own, so
# SchedulerConfig.DEFAULT_MAX_NUM_SEQS.
DEFAULT_MAX_NUM_SEQS = 128
# max_model_len where neither the lane file nor the model's config.json says.
DEFAULT_MAX_MODEL_LEN = 4096
# Knowing neither the memory nor the model: vLLM's former default for VLLM_CPU_KVCACHE_SPACE.
FALLBACK_BYTES = 4 * GIB
# The engine's dtype names for the KV dtype "auto" (the model's dtype).
DTYPE_ALIASES = {"float": "float32", "half": "float16"}


@dataclass(frozen=True)
class ModelKvShape:
    """What the KV bytes per token depend on, from a model's config.json."""

    layers: int
    kv_heads: int
    head_dim: int
    # max_position_embeddings: vLLM's max_model_len where the lane file sets none.
    max_len: int | None = None


@dataclass(frozen=True)
class KvDemand:
    """What one engine can ever hold in its KV cache."""

    max_num_seqs: int
    max_model_len: int
    bytes_per_token: int

    @property
    def fill_bytes(self) -> int:
        return self.max_num_seqs * self.max_model_len * self.bytes_per_token

    @property
    def one_sequence_bytes(self) -> int:
        return self.max_model_len * self.bytes_per_token


@dataclass(frozen=True)
class KvCacheChoice:
    # Bytes of the cache (vLLM's kv_cache_memory_bytes on CPU); 0 on CUDA until started.
    bytes: int
    reason: str
    # The model's KV bytes per token (per tensor-parallel rank); 0 when unknown.
    bytes_per_token: int = 0
    # Tokens the cache holds, known once the engine started.
    tokens: int = 0

    def started(self, tokens: int) -> KvCacheChoice:
        """With the tokens the started engine's cache holds (and on CUDA their bytes)."""
        size = self.bytes or tokens * self.bytes_per_token
        return replace(self, tokens=tokens, bytes=size)


def kv_shape_from_config(config: Mapping[str, Any]) -> ModelKvShape | None:
    """The KV shape of a Hugging Face config.json (its ``text_config`` for multimodal ones);
    None when it does not say."""
    text = config.get("text_config")
    if isinstance(text, Mapping):
        config = text
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim")
    hidden = config.get("hidden_size")
    if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        head_dim = hidden // heads
    values = (layers, kv_heads, head_dim)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return None
    max_len = config.get("max_position_embeddings")
    return ModelKvShape(
        int(layers),  # type: ignore[arg-type]
        int(kv_heads),  # type: ignore[arg-type]
        int(head_dim),  # type: ignore[arg-type]
        max_len if isinstance(max_len, int) and max_len > 0 else None,
    )


def read_kv_shape(model_path: str) -> ModelKvShape | None:
    """The KV shape from ``model_path``/config.json; None for a model that is not a local
    folder (a Hugging Face id) or whose config does not say."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return kv_shape_from_config(config) if isinstance(config, dict) else None


def kv_demand(
    engine_args: Mapping[str, Any], shape: ModelKvShape | None, dtype: str
) -> KvDemand | None:
    """What an engine with ``engine_args`` computing in ``dtype`` can fill; None without a
    shape."""
    if shape is None:
        return None
    kv_dtype = str(engine_args.get("kv_cache_dtype", AUTO))
    if kv_dtype == AUTO:
        kv_dtype = DTYPE_ALIASES.get(dtype, dtype)
    tp = int(engine_args.get("tensor_parallel_size", 1))
    max_model_len = engine_args.get("max_model_len") or shape.max_len or DEFAULT_MAX_MODEL_LEN
    return KvDemand(
        max_num_seqs=int(engine_args.get("max_num_seqs") or DEFAULT_MAX_NUM_SEQS),
        max_model_len=int(max_model_len),
        bytes_per_token=int(kv_bytes_per_token(shape, kv_dtype, tp)),
    )


def choose_kv_cache(
    device: str,
    engine_args: Mapping[str, Any],
    setting_gib: float | None,
    available_bytes: int | None,
    demand: KvDemand | None,
) -> KvCacheChoice:
    """The KV cache of one engine. ``setting_gib`` is the service's ``cpu_kvcache_gib`` (None:
    auto); ``available_bytes`` the memory available at start (None: unknown)."""
    per_token = demand.bytes_per_token if demand is not None else 0
    lane = engine_args.get("kv_cache_memory_bytes")
    if lane is not None:
        return KvCacheChoice(int(lane), "set in the lane file (kv_cache_memory_bytes)", per_token)
    if device == "cuda":
        utilization = float(engine_args.get("gpu_memory_utilization", 0.9))
        return KvCacheChoice(
            0,
            f"cuda: vLLM sizes it from gpu_memory_utilization {utilization:g} of the card "
            "(what the weights and activations leave)",
            per_token,
        )
    if setting_gib is not None:
        return KvCacheChoice(
            int(setting_gib * GIB), f"set by cpu_kvcache_gib ({setting_gib:g} GiB)", per_token
        )
    return _auto(available_bytes, demand)


def _auto(available: int | None, demand: KvDemand | None) -> KvCacheChoice:
    per_token = demand.bytes_per_token if demand is not None else 0
    budget = None
    if available is not None:
        budget = math.floor(available * AVAILABLE_FRACTION / MIB) * MIB
    share = f"{AVAILABLE_FRACTION:.0%} of {_gib(available)} available"
    if demand is None:
        if budget is None:
            return KvCacheChoice(
                FALLBACK_BYTES, "auto: model shape and available memory unknown (4 GiB)"
            )
        size, why = budget, f"auto: {share} (model shape unknown)"
    else:
        fill = (
            f"{demand.max_num_seqs} sequences x {demand.max_model_len} tokens x "
            f"{demand.bytes_per_token} B = {_gib(demand.fill_bytes)}"
        )
        if budget is None:
            size = min(demand.fill_bytes, FALLBACK_BYTES)
            why = f"auto: available memory unknown; the engine can fill {fill} (at most 4 GiB)"
        elif demand.fill_bytes <= budget:
            size, why = (
                demand.fill_bytes,
                f"auto: what the engine can fill, {fill} (within {share})",
            )
        else:
            size, why = budget, f"auto: {share} (the engine could fill {fill})"
    floor = max(MIN_BYTES, demand.one_sequence_bytes if demand is not None else 0)
    if size < floor:
        return KvCacheChoice(
            floor,
            f"{why}; raised to the floor of {_gib(floor)} (1 GiB and one full sequence)",
            per_token,
        )
    return KvCacheChoice(size, why, per_token)


def _gib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / GIB:.2f} GiB"
