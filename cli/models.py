"""``agentmesh models pull``: the explicit model-fetch step.

Serving never downloads (the inference service sets ``HF_HUB_OFFLINE``); this command, run
once per node or as the inference Deployment's init container, puts each hosted lane's
Hugging Face weights into the model cache (``<model_cache_dir>/hf``, the same folder the
service points ``HF_HUB_CACHE`` at). Embedded models are prepared locally and skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from services.inference.config import EMBEDDED_PREFIX, InferenceSettings, hf_cache_dir

app = typer.Typer(help="Model weights: fetch them into the model cache before serving.")
console = Console(stderr=True)
# What vLLM loads: configs, tokenizer files, safetensors shards (not .bin / .pth duplicates).
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")

Fetch = Callable[..., Any]


@dataclass(frozen=True)
class Download:
    lane: str
    repo_id: str
    cache_dir: Path


def planned_downloads(settings: InferenceSettings, lanes: Sequence[str] = ()) -> list[Download]:
    """One download per distinct Hugging Face model among ``lanes`` (default: the hosted)."""
    config = settings.load_lanes()
    names = list(lanes) or config.hosted_lanes
    unknown = [n for n in names if n not in config.lanes]
    if unknown:
        raise typer.BadParameter(
            f"unknown lanes {', '.join(unknown)} (preset has: {', '.join(config.lanes)})",
            param_hint="--lane",
        )
    out: dict[str, Download] = {}
    for name in names:
        model = config.lanes[name].model
        if model.startswith(EMBEDDED_PREFIX) or Path(model).is_absolute():
            continue
        out.setdefault(model, Download(name, model, hf_cache_dir(settings)))
    return list(out.values())


def pull_models(downloads: Sequence[Download], fetch: Fetch) -> list[Path]:
    """Runs ``fetch`` (huggingface_hub.snapshot_download) per download; returns the folders."""
    done = []
    for d in downloads:
        d.cache_dir.mkdir(parents=True, exist_ok=True)
        path = fetch(
            repo_id=d.repo_id,
            cache_dir=str(d.cache_dir),
            allow_patterns=list(ALLOW_PATTERNS),
        )
        done.append(Path(path))
    return done


@app.command("pull")
def pull(
    lane: list[str] = typer.Option([], "--lane", "-l", help="Lanes to fetch (default: hosted)."),
    preset: str | None = typer.Option(None, help="Lanes preset (default: the settings')."),
    lanes_file: Path | None = typer.Option(None, help="A lanes file of your own."),
    cache_dir: Path | None = typer.Option(None, help="Model cache (default: the settings')."),
    dry_run: bool = typer.Option(False, help="Print what would be fetched, fetch nothing."),
) -> None:
    """Download the Hugging Face weights of the hosted lanes into the model cache."""
    overrides: dict[str, Any] = {}
    if preset:
        overrides["preset"] = preset
    if lanes_file:
        overrides["lanes_file"] = lanes_file
    if cache_dir:
        overrides["model_cache_dir"] = cache_dir
    settings = InferenceSettings(**overrides)
    downloads = planned_downloads(settings, lane)
    if not downloads:
        console.print("nothing to fetch: the lanes use embedded models (prepared locally)")
        return
    for d in downloads:
        console.print(f"{d.lane}: {d.repo_id} -> {d.cache_dir}")
    if dry_run:
        return
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0"):
        console.print(
            "[red]HF_HUB_OFFLINE is set: `models pull` needs the network. Unset it for this "
            "command only (serving keeps it set).[/red]"
        )
        raise typer.Exit(2)
    from huggingface_hub import snapshot_download

    try:
        paths = pull_models(downloads, snapshot_download)
    except Exception as exc:  # the hub's errors: connection, auth (gated models), not found
        console.print(
            f"[red]could not fetch the weights ({exc.__class__.__name__}): check the "
            "network, HF_ENDPOINT, and HF_TOKEN for gated models (Llama).[/red]"
        )
        raise typer.Exit(1) from None
    for path in paths:
        console.print(f"fetched {path}")
