"""Facts about the machine an engine starts on: the one place that reads it.

The engine's dtype (dtype.py), KV cache size (kv_cache.py) and OpenMP thread binding
(cpu_threads.py) are pure choices over these facts, so each machine kind is unit-tested with
facts of its own; :func:`machine_facts` reads the real ones (``/proc/cpuinfo``,
``/proc/meminfo``, the cgroup's memory limit, the CPU topology in sysfs and this process's
CPU affinity), or for CUDA the device's compute capability.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from shared.cpu_affinity import current_cpus

# cgroup v1 reports "no limit" as a number close to 2**63.
CGROUP_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class LogicalCpu:
    """One logical CPU this process may run on."""

    id: int
    # Physical core within its package (SMT siblings share it) ...
    core: int
    # ... its package (socket) and NUMA node.
    package: int = 0
    node: int = 0

    @property
    def physical_core(self) -> tuple[int, int]:
        return (self.package, self.core)


@dataclass(frozen=True)
class MachineFacts:
    """What the engine's dtype, KV cache and thread choices depend on."""

    # "cpu" or "cuda".
    device: str
    # CPU feature flags (from /proc/cpuinfo); empty when unknown.
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    # CUDA compute capability of the device the engine uses (major, minor).
    cuda_capability: tuple[int, int] | None = None
    # MemAvailable of /proc/meminfo; None when unknown.
    mem_available_bytes: int | None = None
    # The cgroup's memory limit and what the cgroup uses now (containers); None without one.
    cgroup_limit_bytes: int | None = None
    cgroup_used_bytes: int | None = None
    # The logical CPUs this process may run on (its affinity), sorted by id; empty when
    # unknown.
    cpus: tuple[LogicalCpu, ...] = ()

    @property
    def available_memory_bytes(self) -> int | None:
        """Memory a new allocation can take: MemAvailable, capped by what the cgroup's limit
        leaves (in a container MemAvailable is the host's)."""
        room = None
        if self.cgroup_limit_bytes is not None:
            room = max(0, self.cgroup_limit_bytes - (self.cgroup_used_bytes or 0))
        if self.mem_available_bytes is None:
            return room
        return self.mem_available_bytes if room is None else min(self.mem_available_bytes, room)


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in ``/proc/cpuinfo`` text (x86 ``flags``,
    arm ``Features``)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def parse_mem_available(meminfo: str) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` text, in bytes."""
    for line in meminfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "MemAvailable":
            parts = value.split()
            if parts and parts[0].isdigit():
                unit = parts[1].lower() if len(parts) > 1 else ""
                return int(parts[0]) * (1024 if unit == "kb" else 1)
    return None


# What a GPU torch can use needs its driver's files: NVIDIA's control device and proc folder,
# WSL2's GPU device, ROCm's kernel driver (torch.cuda on AMD cards).
GPU_DRIVER_PATHS = ("dev/nvidiactl", "proc/driver/nvidia", "dev/dxg", "dev/kfd")


def gpu_driver_present(root: Path = Path("/")) -> bool:
    """Whether a GPU driver torch could use is on this machine (no torch import)."""
    return any((root / path).exists() for path in GPU_DRIVER_PATHS)


def detect_device(root: Path = Path("/")) -> str:
    """``gpu`` when a CUDA device is visible to torch, else ``cpu``. Without a GPU driver
    (:func:`gpu_driver_present`) ``cpu`` at once: importing torch to learn it takes ~1.5 s
    (``agentmesh up`` asks before it starts anything). ``root`` is for tests."""
    if not gpu_driver_present(root):
        return "cpu"
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def machine_facts(
    device: str, root: Path = Path("/"), allowed_cpus: Iterable[int] | None = None
) -> MachineFacts:
    """Facts about this machine for ``device`` ("cpu" or "cuda"); may import torch.

    ``root`` and ``allowed_cpus`` (default: this process's affinity) are for tests.
    """
    if device == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability()
        return MachineFacts("cuda", cuda_capability=(int(major), int(minor)))
    limit, used = _cgroup_memory(root / "sys" / "fs" / "cgroup")
    if allowed_cpus is None:
        allowed_cpus = current_cpus()
    return MachineFacts(
        "cpu",
        cpu_flags=parse_cpu_flags(_read(root / "proc" / "cpuinfo")),
        mem_available_bytes=parse_mem_available(_read(root / "proc" / "meminfo")),
        cgroup_limit_bytes=limit,
        cgroup_used_bytes=used,
        cpus=_topology(root / "sys" / "devices" / "system" / "cpu", allowed_cpus),
    )


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _read_int(path: Path) -> int | None:
    text = _read(path).strip()
    return int(text) if text.isdigit() else None


def _cgroup_memory(cgroup: Path) -> tuple[int | None, int | None]:
    """(limit, usage) of this process's cgroup: v2 ``memory.max``, else v1; (None, None)
    without a limit."""
    limit = _read_int(cgroup / "memory.max")
    if limit is not None:
        return limit, _read_int(cgroup / "memory.current")
    v1 = cgroup / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    if limit is not None and limit < CGROUP_V1_UNLIMITED:
        return limit, _read_int(v1 / "memory.usage_in_bytes")
    return None, None


def _topology(sysfs_cpu: Path, allowed: Iterable[int]) -> tuple[LogicalCpu, ...]:
    """Each allowed logical CPU with its core, package and NUMA node from sysfs (each its own
    core on node 0 where sysfs does not say)."""
    cpus = []
    for cpu in sorted(set(allowed)):
        base = sysfs_cpu / f"cpu{cpu}"
        topo = base / "topology"
        core = _read_int(topo / "core_id")
        package = _read_int(topo / "physical_package_id")
        node = 0
        try:
            nodes = [m for p in base.iterdir() if (m := re.fullmatch(r"node(\d+)", p.name))]
        except OSError:
            nodes = []
        if nodes:
            node = int(nodes[0].group(1))
        cpus.append(LogicalCpu(cpu, cpu if core is None else core, package or 0, node))
    return tuple(cpus)
