"""The prepared GPU run without a GPU: the shell script parses, the Python entry point's
--dry-run plans dummy weights when the model is not cached, the dummy folder has the 14B
AWQ shape, and run_all rebuilds a report from raw section files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench import gpu, run_all
from tests.bench.test_report import synthetic

REPO = Path(__file__).resolve().parents[2]


def test_gpu_script_parses() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    subprocess.run([bash, "-n", str(REPO / "bench" / "gpu_run.sh")], check=True)


def test_dry_run_plans_dummy_weights_without_a_cached_model(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu",
            "--dry-run",
            "--model-cache",
            str(tmp_path / "empty-cache"),
            "--dummy-dir",
            str(tmp_path / "dummy"),
            "--out",
            str(tmp_path / "report"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"},
    )
    steps = json.loads(out.stdout)
    assert steps["weights"] == "dummy"
    assert steps["preset"] == "rtx4090"
    command = steps["command"]
    assert command[1:3] == ["-m", "bench.run_all"]
    assert command[command.index("--load-format") + 1] == "dummy"
    assert command[command.index("--model") + 1] == str(tmp_path / "dummy")
    assert command[command.index("--sections") + 1] == "offline,serve"
    assert not (tmp_path / "dummy").exists()  # a dry run writes nothing


def test_dummy_model_folder_has_the_awq_14b_shape(tmp_path: Path) -> None:
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    folder = gpu.dummy_model(tmp_path / "dummy", tokenizer)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 48
    assert config["quantization_config"]["quant_method"] == "awq"
    assert (folder / "tokenizer.json").read_text() == "{}"


def test_run_all_rebuilds_the_report_from_raw_sections(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, data in synthetic().items():
        if name in run_all.SECTIONS:
            (raw / f"{name}.json").write_text(json.dumps(data))
    assert run_all.main(["--from-raw", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "A whole turn vs its floor" in md
    assert (tmp_path / "capacity.png").is_file()
