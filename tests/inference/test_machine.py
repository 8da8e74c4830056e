"""Reading the machine's facts: cpuinfo flags, MemAvailable, the cgroup limit, the CPU topology
(from a fake root tree, so each machine kind is a folder)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from services.inference.machine import (
    LogicalCpu,
    MachineFacts,
    detect_device,
    gpu_driver_present,
    machine_facts,
    parse_cpu_flags,
    parse_mem_available,
)

GIB = 1024**3
AMD = """processor\t: 0
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse avx2 avx512f avx512_bf16
"""
MEMINFO = """MemTotal:       24683584 kB
MemFree:        14107164 kB
MemAvailable:   16777216 kB
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_cpu(root: Path, cpu: int, core: int, package: int, node: int) -> None:
    base = root / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}"
    write(base / "topology" / "core_id", f"{core}\n")
    write(base / "topology" / "physical_package_id", f"{package}\n")
    (base / f"node{node}").mkdir(parents=True)


def test_parse_cpu_flags_reads_the_first_flags_line() -> None:
    flags = parse_cpu_flags(AMD + "\nflags\t\t: other\n")
    assert {"avx2", "avx512_bf16", "avx512f"} <= flags and "other" not in flags
    assert parse_cpu_flags("Features\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}
    assert parse_cpu_flags("") == frozenset()


def test_parse_mem_available_in_bytes() -> None:
    assert parse_mem_available(MEMINFO) == 16 * GIB
    assert parse_mem_available("MemTotal: 1 kB\n") is None
    assert parse_mem_available("") is None


def test_a_two_socket_smt_machine_in_a_container(tmp_path: Path) -> None:
    write(tmp_path / "proc" / "cpuinfo", AMD)
    write(tmp_path / "proc" / "meminfo", MEMINFO)
    write(tmp_path / "sys" / "fs" / "cgroup" / "memory.max", f"{8 * GIB}\n")
    write(tmp_path / "sys" / "fs" / "cgroup" / "memory.current", f"{3 * GIB}\n")
    # cpus 0-1 and their SMT siblings 2-3 on package 0 / node 0; cpu 4 on package 1 / node 1.
    for cpu, core, package, node in [(0, 0, 0, 0), (1, 1, 0, 0), (2, 0, 0, 0), (3, 1, 0, 0)]:
        fake_cpu(tmp_path, cpu, core, package, node)
    fake_cpu(tmp_path, 4, 0, 1, 1)
    facts = machine_facts("cpu", tmp_path, allowed_cpus=[4, 0, 1, 2, 3])
    assert facts.device == "cpu" and "avx512_bf16" in facts.cpu_flags
    assert facts.mem_available_bytes == 16 * GIB
    assert (facts.cgroup_limit_bytes, facts.cgroup_used_bytes) == (8 * GIB, 3 * GIB)
    # The container's limit leaves 5 GiB though the host has 16 available.
    assert facts.available_memory_bytes == 5 * GIB
    assert facts.cpus == (
        LogicalCpu(0, 0, 0, 0),
        LogicalCpu(1, 1, 0, 0),
        LogicalCpu(2, 0, 0, 0),
        LogicalCpu(3, 1, 0, 0),
        LogicalCpu(4, 0, 1, 1),
    )
    assert facts.cpus[0].physical_core == facts.cpus[2].physical_core
    assert facts.cpus[0].physical_core != facts.cpus[4].physical_core


def test_only_allowed_cpus_and_unlimited_cgroups(tmp_path: Path) -> None:
    write(tmp_path / "proc" / "meminfo", MEMINFO)
    write(tmp_path / "sys" / "fs" / "cgroup" / "memory.max", "max\n")
    write(tmp_path / "sys" / "fs" / "cgroup" / "memory" / "memory.limit_in_bytes", f"{1 << 63}")
    facts = machine_facts("cpu", tmp_path, allowed_cpus=[3, 1])
    assert facts.cgroup_limit_bytes is None and facts.available_memory_bytes == 16 * GIB
    # No sysfs topology: each CPU its own core on node 0.
    assert facts.cpus == (LogicalCpu(1, 1, 0, 0), LogicalCpu(3, 3, 0, 0))


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    v1 = tmp_path / "sys" / "fs" / "cgroup" / "memory"
    write(v1 / "memory.limit_in_bytes", f"{4 * GIB}")
    write(v1 / "memory.usage_in_bytes", f"{1 * GIB}")
    facts = machine_facts("cpu", tmp_path, allowed_cpus=[0])
    # MemAvailable unknown: the cgroup's room is all there is.
    assert facts.mem_available_bytes is None and facts.available_memory_bytes == 3 * GIB


def test_nothing_readable(tmp_path: Path) -> None:
    assert machine_facts("cpu", tmp_path / "missing", allowed_cpus=[]) == MachineFacts("cpu")
    assert MachineFacts("cpu").available_memory_bytes is None


def test_this_machine_has_facts() -> None:
    facts = machine_facts("cpu")
    assert facts.cpus and facts.mem_available_bytes is not None
    assert facts.available_memory_bytes is not None and facts.available_memory_bytes > 0


def test_detect_device_asks_torch_only_where_a_gpu_driver_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a GPU driver the answer is cpu without torch (here a torch that would say gpu);
    with one, torch decides."""
    gpu_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", gpu_torch)
    assert not gpu_driver_present(tmp_path)
    assert detect_device(tmp_path) == "cpu"
    for driver in ("dev/nvidiactl", "proc/driver/nvidia", "dev/dxg", "dev/kfd"):
        root = tmp_path / driver.replace("/", "_")
        write(root / driver, "")
        assert gpu_driver_present(root)
        assert detect_device(root) == "gpu"
    cpu_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", cpu_torch)
    assert detect_device(tmp_path / "dev_nvidiactl") == "cpu"
