"""The engine's compute dtype, chosen for the machine it starts on.

A lane file may say ``dtype: auto`` (the embedded preset does): at engine start it resolves
to what the hardware computes natively. On CPU, bfloat16 only where the CPU has bf16
instructions (``avx512_bf16`` or ``amx_bf16``); elsewhere torch emulates bf16 and float32 is
several times faster (AVX2-only AMD: prefill 35 vs 154 tokens/s). On CUDA, bfloat16 from
compute capability 8.0 (Ampere) on, else float16. An explicit dtype in the lane file wins.

:func:`choose_dtype` is pure (machine facts in, choice out) so each machine kind is
unit-tested; :func:`services.inference.machine.machine_facts` is the one place that reads the
real machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.inference.machine import MachineFacts

AUTO = "auto"
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CUDA_BF16_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    device: str
    reason: str


def choose_dtype(requested: object, facts: MachineFacts) -> DtypeChoice:
    """The dtype an engine should compute in; ``requested`` is the lane file's value."""
    if requested is not None and str(requested).strip().lower() not in ("", AUTO):
        return DtypeChoice(str(requested), facts.device, "set in the lane file")
    if facts.device == "cuda":
        cap = facts.cuda_capability
        if cap is not None and cap >= CUDA_BF16_MIN_CAPABILITY:
            return DtypeChoice(
                "bfloat16", "cuda", f"auto: CUDA compute capability {cap[0]}.{cap[1]} has bf16"
            )
        shown = f"{cap[0]}.{cap[1]}" if cap is not None else "unknown"
        return DtypeChoice(
            "float16", "cuda", f"auto: CUDA compute capability {shown} < 8.0 has no fast bf16"
        )
    native = [flag for flag in CPU_BF16_FLAGS if flag in facts.cpu_flags]
    if native:
        return DtypeChoice(
            "bfloat16", facts.device, f"auto: CPU computes bf16 natively ({native[0]})"
        )
    return DtypeChoice(
        "float32",
        facts.device,
        "auto: CPU has no native bf16 (no avx512_bf16/amx_bf16; bf16 would be emulated)",
    )
