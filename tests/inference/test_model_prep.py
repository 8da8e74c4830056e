"""Embedded model preparation: locating the GGUF and refusing half-written or corrupt folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.inference import model_prep
from services.inference.model_prep import ModelPrepError, prepare, verify


def _sealed(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x01" * 4096)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    source = folder.parent / "src.gguf"
    source.write_bytes(b"gguf")
    model_prep._write_manifest(folder, source)
    return folder


def test_gguf_is_found_without_importing_the_package() -> None:
    model = model_prep.lookup("smollm2-135m-instruct")
    path = model_prep.locate_gguf(model)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 10_000_000


def test_sealed_folder_verifies(tmp_path: Path) -> None:
    verify(_sealed(tmp_path / "m"))


def test_half_written_folder_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(ModelPrepError, match="no manifest"):
        verify(folder)


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    folder = _sealed(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x01" * 100)
    with pytest.raises(ModelPrepError, match="wrong size"):
        verify(folder)


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    folder = _sealed(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x02" * 4096)
    with pytest.raises(ModelPrepError, match="checksum"):
        verify(folder)
    # prepare() refuses it too instead of loading it (no silent rebuild without --force).
    target = folder.rename(tmp_path / "smollm2-135m-instruct")
    with pytest.raises(ModelPrepError, match="--force"):
        prepare("smollm2-135m-instruct", tmp_path, progress=False)
    assert target.exists()


def test_unknown_embedded_model() -> None:
    with pytest.raises(ModelPrepError, match="unknown embedded model"):
        model_prep.resolve_model("embedded:nope", Path("/nonexistent"))
    assert model_prep.resolve_model("Qwen/Qwen2.5-14B-Instruct-AWQ", Path("/x")) == (
        "Qwen/Qwen2.5-14B-Instruct-AWQ"
    )
