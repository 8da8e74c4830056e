"""deploy/k8s: every overlay renders (kubectl's built-in kustomize), every object passes
`kubernetes-validate --strict`, and the policy checks hold: requests and limits everywhere,
GPUs only on inference, probes everywhere, pinned images, security contexts, selectors that
match their pods, and NetworkPolicy edges that are exactly the mesh's real calls (derived
from the rendered configuration, not written twice)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu", "rtx4090"]
BIN = Path(sys.executable).parent
WORKLOADS = ("Deployment", "StatefulSet")
HEALTH = "agentmesh.inference.v1.InferenceService"


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[dev]' brings it)"
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def of_kind(objects: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in kinds]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def pods(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(workload name, pod labels, pod spec) per Deployment / StatefulSet."""
    return [
        (
            w["metadata"]["name"],
            w["spec"]["template"]["metadata"]["labels"],
            w["spec"]["template"]["spec"],
        )
        for w in of_kind(objects, *WORKLOADS)
    ]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def selected(objects: list[dict[str, Any]], selector: dict[str, str]) -> set[str]:
    return {name for name, labels, _ in pods(objects) if matches(selector, labels)}


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


# ---------------------------------------------------------------------- render + validate


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_kubernetes_validate_strict(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    assert {"Deployment", "Service", "NetworkPolicy", "ConfigMap", "Secret"} <= {
        d["kind"] for d in docs
    }
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(rendered)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The only objects without a built-in schema: the Prometheus Operator's ServiceMonitors.
    unknown = {
        line.split("kind ")[1].split(" ")[0]
        for line in done.stdout.splitlines()
        if "Couldn't find schema" in line
    }
    assert unknown <= {"ServiceMonitor", "PrometheusRule"}


def test_service_monitors_have_the_fields_the_operator_reads(objects: list[dict[str, Any]]) -> None:
    services = of_kind(objects, "Service")
    for monitor in of_kind(objects, "ServiceMonitor"):
        assert set(monitor["spec"]) == {"selector", "endpoints"}
        hits = [
            s
            for s in services
            if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert hits, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in hits)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_lanes_file_is_the_shipped_preset(overlay: str) -> None:
    preset = "embedded" if overlay == "cpu" else "rtx4090"
    copy = K8S / "overlays" / overlay / f"lanes-{preset}.yaml"
    assert copy.read_text() == (ROOT / "config" / "lanes" / f"{preset}.yaml").read_text()


# ---------------------------------------------------------------------- policy checks


def test_requests_and_limits_on_every_container(objects: list[dict[str, Any]]) -> None:
    for name, _, spec in pods(objects):
        for c in containers(spec):
            for key in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][key]), (name, c["name"], key)


def test_gpus_only_on_inference(
    objects: list[dict[str, Any]], request: pytest.FixtureRequest
) -> None:
    overlay = request.node.callspec.params["objects"]
    gpu_pods = set()
    for name, labels, spec in pods(objects):
        for c in containers(spec):
            if "nvidia.com/gpu" in c["resources"]["limits"]:
                gpu_pods.add(name)
                assert labels.get("app.kubernetes.io/component") == "inference"
                assert (
                    c["resources"]["limits"]["nvidia.com/gpu"]
                    == c["resources"]["requests"]["nvidia.com/gpu"]
                )
        if name in gpu_pods:
            assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
                "tolerations"
            ]
    inference = {
        n
        for n, labels, _ in pods(objects)
        if labels.get("app.kubernetes.io/component") == "inference"
    }
    assert inference
    # The cpu overlay asks for no GPU; on rtx4090 every inference pod does.
    assert gpu_pods == (inference if overlay == "rtx4090" else set()), overlay


def test_one_gpu_deployment_per_lane_and_heavy_on_two_cards() -> None:
    objects = render("rtx4090")
    gpus = {}
    for name, _, spec in pods(objects):
        if name.startswith("inference-"):
            (main,) = spec["containers"]
            env = {e["name"]: e["value"] for e in main["env"]}
            assert yaml.safe_load(env["AGENTMESH_INFERENCE_HOSTED_LANES"]) == [
                name.removeprefix("inference-")
            ]
            gpus[name] = main["resources"]["limits"]["nvidia.com/gpu"]
            (init,) = spec["initContainers"]
            assert init["command"][:3] == ["agentmesh", "models", "pull"]
    assert gpus == {
        "inference-workhorse": 1,
        "inference-planner": 1,
        "inference-heavy": 2,
        "inference-speed": 1,
    }


def test_probes_everywhere_and_grpc_health_per_lane(objects: list[dict[str, Any]]) -> None:
    for name, labels, spec in pods(objects):
        for c in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, (name, probe)
        if labels.get("app.kubernetes.io/component") == "inference":
            (main,) = spec["containers"]
            lanes = yaml.safe_load(
                {e["name"]: e["value"] for e in main["env"]}["AGENTMESH_INFERENCE_HOSTED_LANES"]
            )
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert main[probe]["grpc"] == {"port": 50052, "service": f"{HEALTH}/{lanes[0]}"}
            # Long enough for a model load: at least 20 minutes before the first failure counts.
            startup = main["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200


def test_every_image_is_pinned(objects: list[dict[str, Any]]) -> None:
    for name, _, spec in pods(objects):
        for c in containers(spec):
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", (name, image)


def test_security_contexts(objects: list[dict[str, Any]]) -> None:
    for name, _, spec in pods(objects):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}


def test_every_selector_matches_its_pods(objects: list[dict[str, Any]]) -> None:
    for w in of_kind(objects, *WORKLOADS):
        assert matches(
            w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]
        )
    for s in of_kind(objects, "Service"):
        assert selected(objects, s["spec"]["selector"]), s["metadata"]["name"]
        for port in s["spec"]["ports"]:
            (target,) = [n for n in selected(objects, s["spec"]["selector"])][:1]
            spec = next(sp for n, _, sp in pods(objects) if n == target)
            assert port["targetPort"] in {p["name"] for c in spec["containers"] for p in c["ports"]}
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        assert selected(objects, pdb["spec"]["selector"]["matchLabels"]), pdb["metadata"]["name"]
    for np in of_kind(objects, "NetworkPolicy"):
        selector = np["spec"]["podSelector"].get("matchLabels", {})
        assert selected(objects, selector), np["metadata"]["name"]
    names = {w["metadata"]["name"] for w in of_kind(objects, "Deployment")}
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in names
    assert {
        h["spec"]["scaleTargetRef"]["name"] for h in of_kind(objects, "HorizontalPodAutoscaler")
    } == {"orchestrator", "tools"}


# ---------------------------------------------------------------------- the call graph


def _host_port(url: str, default: int) -> tuple[str, int]:
    url = url.removeprefix("dns:///")
    if "://" not in url:
        host, _, port = url.rpartition(":")
        return host.split(".")[0], int(port)
    parsed = urlparse(url)
    return (parsed.hostname or "").split(".")[0], parsed.port or default


def _service_pods(objects: list[dict[str, Any]], service: str) -> set[str]:
    s = named(objects, "Service", service)
    return selected(objects, s["spec"]["selector"])


def real_calls(objects: list[dict[str, Any]]) -> set[tuple[str, str, int]]:
    """(from, to, port) the configuration makes: targets in the ConfigMaps and Secrets."""
    config = {
        cm["metadata"]["name"].rsplit("-", 1)[0]: yaml.safe_load(cm["data"]["config.yaml"])
        for cm in of_kind(objects, "ConfigMap")
        if "config.yaml" in cm.get("data", {})
    }
    orchestrator = config["agentmesh-orchestrator"]["orchestrator"]
    tools = config["agentmesh-tools"]["tools"]
    import base64

    secret = {
        k: base64.b64decode(v).decode()
        for s in of_kind(objects, "Secret")
        for k, v in s.get("data", {}).items()
    }
    calls = set()

    def call(src: str, target: str, default: int = 0) -> None:
        host, port = _host_port(target, default)
        for pod in _service_pods(objects, host):
            calls.add((src, pod, port))

    call("orchestrator", orchestrator["tools"]["target"])
    for targets in orchestrator["topology"]["lanes"].values():
        for target in targets:
            call("orchestrator", target)
    call("orchestrator", secret["AGENTMESH_ORCHESTRATOR_SESSION_STORE_URL"], 5432)
    call("tools", secret["AGENTMESH_TOOLS_CRM_DATABASE_URL"], 5432)
    call("tools", secret["AGENTMESH_TOOLS_BILLING_DATABASE_URL"], 5432)
    call("tools", tools["qdrant_url"], 6333)
    calls.add(("tools", "qdrant", 6334))  # qdrant-client's gRPC port (prefer_grpc)
    if tools.get("billing_backend") == "http":
        calls.add(("tools", "external", urlparse(tools["billing_api_url"]).port or 443))
    for name, _, spec in pods(objects):
        if any(
            c["command"][:3] == ["agentmesh", "models", "pull"]
            for c in spec.get("initContainers", [])
        ):
            calls.add((name, "external", 443))  # Hugging Face
    # Every pod that calls out resolves names first.
    internal = {n for n, _, _ in pods(objects)}
    calls |= {(src, "dns", 53) for src, _, _ in list(calls) if src in internal}
    # Clients reach the orchestrator; Prometheus scrapes every ServiceMonitor's port.
    calls.add(("any", "orchestrator", 50051))
    for monitor in of_kind(objects, "ServiceMonitor"):
        for svc in of_kind(objects, "Service"):
            if matches(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]):
                port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "metrics")
                for pod in selected(objects, svc["spec"]["selector"]):
                    calls.add(("monitoring", pod, port))
    return calls


def _peers(objects: list[dict[str, Any]], peers: list[dict[str, Any]] | None) -> set[str]:
    if not peers:
        return {"any"}
    out = set()
    for peer in peers:
        if "ipBlock" in peer:
            out.add("external")
        elif peer.get("podSelector", {}).get("matchLabels", {}).get("k8s-app") == "kube-dns":
            out.add("dns")
        elif "namespaceSelector" in peer:
            out.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
        else:
            out |= selected(objects, peer["podSelector"]["matchLabels"])
    return out


def policy_edges(
    objects: list[dict[str, Any]],
) -> tuple[set[tuple[str, str, int]], set[tuple[str, str, int]]]:
    """(ingress edges, egress edges) the NetworkPolicies allow, as (from, to, port)."""
    ingress, egress = set(), set()
    for np in of_kind(objects, "NetworkPolicy"):
        spec = np["spec"]
        targets = selected(objects, spec["podSelector"].get("matchLabels", {}))
        for rule in spec.get("ingress", []):
            for src in _peers(objects, rule.get("from")):
                for port in rule["ports"]:
                    ingress |= {(src, t, port["port"]) for t in targets}
        for rule in spec.get("egress", []):
            for dst in _peers(objects, rule.get("to")):
                for port in rule["ports"]:
                    egress |= {(t, dst, port["port"]) for t in targets}
    return ingress, egress


def test_network_policies_deny_by_default(objects: list[dict[str, Any]]) -> None:
    deny = named(objects, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {
        "podSelector": {},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [],
        "egress": [],
    }


def test_every_network_policy_edge_is_a_real_call_and_every_call_is_allowed(
    objects: list[dict[str, Any]],
) -> None:
    calls = real_calls(objects)
    ingress, egress = policy_edges(objects)
    internal = {n for n, _, _ in pods(objects)}
    assert ingress - calls == set()
    assert egress - calls == set()
    for src, dst, port in calls:
        if src in internal:
            assert (src, dst, port) in egress, ("egress missing", src, dst, port)
        if dst in internal:
            assert (src, dst, port) in ingress, ("ingress missing", src, dst, port)


# ---------------------------------------------------------------------- images


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "deploy" / "docker").glob("*.Dockerfile")))
def test_dockerfiles_pin_their_bases_and_run_as_non_root(dockerfile: Path) -> None:
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert bases
    for base in bases:
        tag = base.partition(":")[2]
        assert tag and tag != "latest" and any(ch.isdigit() for ch in tag), base
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")) :]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    # The Kubernetes side: the pods run it with readOnlyRootFilesystem (test_security_contexts).
