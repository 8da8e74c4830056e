"""Where ``agentmesh up`` puts the tools and orchestrator services on a CPU engine's machine.

The inference service pins itself (and vLLM's engine core) off its engine's OpenMP team once
the engine started (``cpu_affinity: auto``, services/inference/placement.py). The other
services of the mesh would otherwise land on the team's cores next to its spinning threads
(a kb_search's embedding took ~450 ms there instead of 15-40 ms), so ``up`` starts them on the
same cores: ``AGENTMESH_<SERVICE>_CPU_AFFINITY``, computed from the inference settings the
mesh's inference service loads, where ``up`` starts that service, the host has no GPU and the
variable (or the service's ``cpu_affinity`` in the config file) is not set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.inference.machine import MachineFacts

# The services `up` places, and the variable each reads its cpu_affinity from.
PLACED = {
    "tools": "AGENTMESH_TOOLS_CPU_AFFINITY",
    "orchestrator": "AGENTMESH_ORCHESTRATOR_CPU_AFFINITY",
}


@dataclass(frozen=True)
class MeshPlacement:
    # Per service: the variables to add to its environment.
    env: dict[str, dict[str, str]] = field(default_factory=dict)
    # What `up` says about it (one line).
    summary: str = ""


def host_facts() -> MachineFacts:
    """This machine as the inference service will find it (torch asked about the GPU only where
    a GPU driver is present: machine.detect_device)."""
    from services.inference.machine import detect_device, machine_facts

    if detect_device() == "gpu":
        return MachineFacts("cuda")
    return machine_facts("cpu")


def mesh_placement(
    services: Sequence[str],
    env: Mapping[str, str],
    facts: Callable[[], MachineFacts] = host_facts,
) -> MeshPlacement:
    """The cpu_affinity of each placed service among ``services`` (those ``up`` starts), whose
    environment is ``env`` (its ``AGENTMESH_CONFIG`` the config file)."""
    from services.inference.config import InferenceSettings
    from services.inference.placement import cores_off_engine
    from shared.config import load_settings, read_config_section
    from shared.cpu_affinity import format_id_list

    if "inference" not in services:
        return MeshPlacement()
    config = Path(env["AGENTMESH_CONFIG"]) if env.get("AGENTMESH_CONFIG") else None
    try:
        own = {
            name: var
            for name, var in PLACED.items()
            if name in services
            and var not in env
            and "cpu_affinity" not in read_config_section(config, name)
        }
        if not own:
            return MeshPlacement()
        machine = facts()
        if machine.device == "cuda":
            return MeshPlacement(summary="cpu placement: none (the engine runs on the GPU)")
        settings = load_settings(InferenceSettings, "inference", config)
        cores = cores_off_engine(machine, settings)
    except Exception as error:  # each service reports its own configuration errors
        return MeshPlacement(summary=f"cpu placement: none ({error})")
    if not cores:
        return MeshPlacement(summary="cpu placement: none (no core off the engine's OpenMP team)")
    value = format_id_list(cores)
    kept = [name for name in PLACED if name in services and name not in own]
    said = [f"{name} on {value}" for name in own]
    said += [f"{name} as configured" for name in kept]
    said.append(f"inference on {value} once its engine started (its OpenMP team on the rest)")
    return MeshPlacement(
        env={name: {var: value} for name, var in own.items()},
        summary=f"cpu placement: {', '.join(said)}",
    )
