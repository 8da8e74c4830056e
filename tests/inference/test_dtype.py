"""The engine dtype chosen for the machine: a pure function over cpuinfo flags / device facts."""

from __future__ import annotations

from services.inference.dtype import choose_dtype
from services.inference.machine import MachineFacts, parse_cpu_flags

# Trimmed /proc/cpuinfo of each machine kind (flags lines as the kernel prints them).
INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 \
amx_bf16 amx_tile amx_int8 avx512_fp16
"""
# Sapphire Rapids without the avx512_bf16 flag shown (some hypervisors mask it): AMX suffices.
INTEL_AMX_ONLY = INTEL_AMX.replace(" avx512_bf16", "")
AMD_AVX512_BF16 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 \
avx512_vnni avx512_bitalg
"""
AMD_AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu sse sse2 avx avx2 fma bmi1 bmi2 sha_ni
"""


def cpu(text: str) -> MachineFacts:
    return MachineFacts("cpu", cpu_flags=parse_cpu_flags(text))


def test_intel_amx_gets_bf16() -> None:
    for text in (INTEL_AMX, INTEL_AMX_ONLY):
        choice = choose_dtype("auto", cpu(text))
        assert choice.dtype == "bfloat16" and choice.device == "cpu"
        assert "natively" in choice.reason
    assert "amx_bf16" in choose_dtype("auto", cpu(INTEL_AMX_ONLY)).reason


def test_amd_with_avx512_bf16_gets_bf16() -> None:
    choice = choose_dtype("auto", cpu(AMD_AVX512_BF16))
    assert choice.dtype == "bfloat16"
    assert "avx512_bf16" in choice.reason


def test_avx2_only_amd_gets_float32() -> None:
    choice = choose_dtype("auto", cpu(AMD_AVX2_ONLY))
    assert choice.dtype == "float32" and choice.device == "cpu"
    assert "emulated" in choice.reason


def test_explicit_dtype_in_the_lane_file_wins() -> None:
    choice = choose_dtype("bfloat16", cpu(AMD_AVX2_ONLY))
    assert (choice.dtype, choice.reason) == ("bfloat16", "set in the lane file")
    gpu = choose_dtype("float32", MachineFacts("cuda", cuda_capability=(9, 0)))
    assert gpu.dtype == "float32" and gpu.device == "cuda"


def test_missing_or_auto_resolves() -> None:
    assert choose_dtype(None, cpu(AMD_AVX2_ONLY)).dtype == "float32"
    assert choose_dtype("AUTO", cpu(AMD_AVX512_BF16)).dtype == "bfloat16"
    assert choose_dtype("auto", MachineFacts("cpu")).dtype == "float32"  # flags unknown


def test_cuda_by_compute_capability() -> None:
    ada = choose_dtype("auto", MachineFacts("cuda", cuda_capability=(8, 9)))
    assert ada.dtype == "bfloat16" and "8.9" in ada.reason
    turing = choose_dtype("auto", MachineFacts("cuda", cuda_capability=(7, 5)))
    assert turing.dtype == "float16" and "7.5" in turing.reason
