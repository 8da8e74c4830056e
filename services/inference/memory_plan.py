"""Per-device memory plan of a GPU deployment: does this layout fit the card?

Pure arithmetic, checked when a lanes file is loaded, so an impossible layout fails at
configuration time with the numbers instead of as a silently FAILED lane (vLLM's free-memory
check) or an out-of-memory at load. Per lane, per GPU (tensor parallel splits weights and KV
heads over ``tensor_parallel_size`` cards):

- **weights** = quantised params x bits / 8 x (1 + group-scale overhead) + unquantised params
  (embeddings, lm head) x 2 bytes, minus what ``cpu_offload_gb`` keeps in host memory;
- **KV** = layers x KV heads x head dim x KV dtype bytes x 2 (K and V) per token, for
  max(``max_model_len``, ``max_model_len`` x ``max_num_seqs`` x ``kv_fill``) tokens: vLLM needs
  at least one full-length sequence to start, and the plan sizes the cache for ``max_num_seqs``
  sequences averaging ``kv_fill`` of the window;
- **activation headroom**: the profiling run's peak plus CUDA context and graphs;

and the sum must be within the lane's budget, ``gpu_memory_utilization`` x card memory.
Engines sharing a card split it: their utilisations must add up to at most
``MAX_SHARED_UTILIZATION`` (each vLLM engine checks that its share is free when it starts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

GIB = 1024**3
GB = 1000**3
# Bits per quantised weight and the per-group scale/zero overhead (group size 128, fp16 scale
# + packed zero: ~2.5 bytes per 128 weights for int4).
QUANT_BITS: dict[str, tuple[float, float]] = {
    "awq_marlin": (4, 0.04),
    "awq": (4, 0.04),
    "gptq_marlin": (4, 0.04),
    "gptq": (4, 0.04),
    "fp8": (8, 0.0),
    "none": (16, 0.0),
}
# "auto" is the model's dtype: 16 bits on GPUs (the CPU KV size resolves it to the engine's
# dtype, float32 included: kv_cache.py).
KV_DTYPE_BYTES = {
    "auto": 2,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}
# Engines sharing one card: their utilisations together, leaving room for fragmentation.
MAX_SHARED_UTILIZATION = 0.96


class KvShape(Protocol):
    """What the KV cache's size per token depends on (a ModelShape, or a model's config.json
    read by kv_cache.py)."""

    @property
    def layers(self) -> int: ...

    @property
    def kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...


class ModelShape(BaseModel):
    """What the plan needs to know about a lane's model (from its config.json)."""

    model_config = ConfigDict(extra="forbid")

    params_b: float = Field(gt=0)  # total parameters, billions
    # Parameters kept in 16 bits under weight quantisation (embeddings + untied lm head).
    unquantized_params_b: float = Field(default=0.0, ge=0)
    layers: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    # Average fill of the window over max_num_seqs sequences that the KV cache is sized for.
    kv_fill: float = Field(default=0.0625, gt=0, le=1)
    activation_gib: float = Field(default=1.5, ge=0)


class DeviceSpec(BaseModel):
    """The card every deployment of a preset runs on."""

    model_config = ConfigDict(extra="forbid")

    # The node label value (nvidia.com/gpu.product) the Kubernetes overlay selects.
    product: str
    memory_gib: float = Field(gt=0)


@dataclass(frozen=True)
class LanePlan:
    lane: str
    tensor_parallel: int
    utilization: float
    weights_gib: float
    kv_gib: float
    kv_tokens: int
    activation_gib: float
    budget_gib: float

    @property
    def need_gib(self) -> float:
        return self.weights_gib + self.kv_gib + self.activation_gib

    @property
    def fits(self) -> bool:
        return self.need_gib <= self.budget_gib

    def explain(self) -> str:
        return (
            f"lane {self.lane}: weights {self.weights_gib:.2f} GiB + KV {self.kv_gib:.2f} GiB "
            f"({self.kv_tokens} tokens) + activations {self.activation_gib:.2f} GiB = "
            f"{self.need_gib:.2f} GiB per GPU (tp={self.tensor_parallel}) vs budget "
            f"{self.budget_gib:.2f} GiB (gpu_memory_utilization {self.utilization})"
        )


@dataclass(frozen=True)
class DevicePlan:
    deployment: str
    device: DeviceSpec
    lanes: tuple[LanePlan, ...]

    @property
    def utilization(self) -> float:
        return sum(p.utilization for p in self.lanes)

    def problems(self) -> list[str]:
        out = [
            f"deployment {self.deployment}: {p.explain()} does not fit"
            for p in self.lanes
            if not p.fits
        ]
        if len(self.lanes) > 1 and self.utilization > MAX_SHARED_UTILIZATION + 1e-9:
            shares = " + ".join(f"{p.lane} {p.utilization}" for p in self.lanes)
            out.append(
                f"deployment {self.deployment}: engines sharing a {self.device.product} "
                f"claim {shares} = {self.utilization:.2f} of it (at most "
                f"{MAX_SHARED_UTILIZATION}): the second engine would fail vLLM's free-memory "
                "check"
            )
        return out


class MemoryPlanError(ValueError):
    pass


def weights_bytes(shape: ModelShape, quantization: str | None) -> float:
    bits, overhead = QUANT_BITS.get(quantization or "none", QUANT_BITS["none"])
    quantized = (shape.params_b - shape.unquantized_params_b) * 1e9
    return quantized * bits / 8 * (1 + overhead) + shape.unquantized_params_b * 1e9 * 2


def kv_bytes_per_token(shape: KvShape, kv_cache_dtype: str, tensor_parallel: int) -> float:
    heads = max(1, math.ceil(shape.kv_heads / tensor_parallel))
    return shape.layers * heads * shape.head_dim * KV_DTYPE_BYTES.get(kv_cache_dtype, 2) * 2


def plan_lane(
    name: str, shape: ModelShape, engine_args: Mapping[str, Any], device: DeviceSpec
) -> LanePlan:
    tp = int(engine_args.get("tensor_parallel_size", 1))
    utilization = float(engine_args.get("gpu_memory_utilization", 0.9))
    max_model_len = int(engine_args.get("max_model_len", 4096))
    max_num_seqs = int(engine_args.get("max_num_seqs", 256))
    offload = float(engine_args.get("cpu_offload_gb", 0)) * GB
    weights = max(0.0, weights_bytes(shape, engine_args.get("quantization")) / tp - offload)
    tokens = max(max_model_len, math.ceil(max_model_len * max_num_seqs * shape.kv_fill))
    kv = kv_bytes_per_token(shape, str(engine_args.get("kv_cache_dtype", "auto")), tp) * tokens
    return LanePlan(
        lane=name,
        tensor_parallel=tp,
        utilization=utilization,
        weights_gib=weights / GIB,
        kv_gib=kv / GIB,
        kv_tokens=tokens,
        activation_gib=shape.activation_gib,
        budget_gib=utilization * device.memory_gib,
    )


def plan_deployment(
    deployment: str,
    lanes: Sequence[tuple[str, ModelShape | None, Mapping[str, Any]]],
    device: DeviceSpec,
) -> DevicePlan:
    """Lanes with equal engine arguments and model share one engine: pass each engine once."""
    plans = []
    for name, shape, engine_args in lanes:
        if shape is None:
            raise MemoryPlanError(
                f"deployment {deployment}: lane {name} has no `memory` shape; a GPU preset "
                "needs one per lane to plan the card"
            )
        plans.append(plan_lane(name, shape, engine_args, device))
    return DevicePlan(deployment, device, tuple(plans))


def check(plans: Sequence[DevicePlan]) -> None:
    problems = [p for plan in plans for p in plan.problems()]
    if problems:
        raise MemoryPlanError("memory plan refused: " + "; ".join(problems))
