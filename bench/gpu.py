"""The prepared GPU run (bench/gpu_run.sh calls this): the sections that make sense on a GPU,
on the rtx4090 preset's workhorse lane, report under ``--out``.

    python -m bench.gpu [--out bench/results/gpu] [--dry-run] [--quick]

Real weights when the lane's model (Qwen/Qwen2.5-14B-Instruct-AWQ) is in the model cache
(``agentmesh models pull`` or the default Hugging Face cache); otherwise a model folder of
the same shape (Qwen2 14B, AWQ 4-bit: its config.json written here, the embedded model's
tokenizer) loaded with vLLM's dummy weights: throughput and latency are the real kernels',
the text is noise. Sections: the offline engine and our service vs ``vllm serve`` (the turn
section needs a model that follows the prompts: not with dummy weights).
``--dry-run`` prints the plan (model source, commands) and runs nothing heavy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRESET = "rtx4090"
MODEL_ID = "Qwen/Qwen2.5-14B-Instruct-AWQ"
GPU_SECTIONS = ("offline", "serve")

# Qwen2.5-14B-Instruct's shape with AWQ 4-bit weights (its published config.json).
DUMMY_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "max_window_layers": 70,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vocab_size": 152064,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "quantization_config": {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
    },
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


def cached_model(model_id: str, cache_dir: Path) -> str | None:
    """A local snapshot folder of ``model_id`` holding weights, or None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for hub in (cache_dir / "hf", None):
        try:
            folder = snapshot_download(
                model_id, cache_dir=str(hub) if hub else None, local_files_only=True
            )
        except Exception:  # any miss means "not cached"
            continue
        if any(Path(folder).glob("*.safetensors")):
            return str(folder)
    return None


def dummy_model(folder: Path, tokenizer_from: Path) -> Path:
    """A Qwen2.5-14B-AWQ-shaped folder (config + a tokenizer) for ``load_format: dummy``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(DUMMY_CONFIG, indent=1))
    for name in TOKENIZER_FILES:
        source = tokenizer_from / name
        if source.is_file():
            shutil.copyfile(source, folder / name)
    return folder


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """What the run will do: the model source and the run_all command."""
    cache = Path(args.model_cache)
    real = cached_model(MODEL_ID, cache)
    cmd = [
        sys.executable,
        "-m",
        "bench.run_all",
        "--preset",
        PRESET,
        "--device",
        "gpu",
        "--sections",
        ",".join(GPU_SECTIONS),
        "--out",
        str(args.out),
    ]
    if args.quick:
        cmd.append("--quick")
    model = real
    if real is None:
        model = str(Path(args.dummy_dir))
        cmd += ["--model", model, "--load-format", "dummy"]
    else:
        cmd += ["--model", real]
    return {
        "preset": PRESET,
        "model": MODEL_ID,
        "weights": "cached" if real else "dummy",
        "model_folder": model,
        "sections": list(GPU_SECTIONS),
        "command": cmd,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu")
    parser.add_argument("--model-cache", default=str(REPO / "var" / "models"))
    parser.add_argument("--dummy-dir", default=str(REPO / "var" / "gpu-dummy" / "qwen2.5-14b-awq"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = parser.parse_args(argv)
    steps = plan(args)
    print(json.dumps(steps, indent=1), flush=True)
    if args.dry_run:
        return 0
    if steps["weights"] == "dummy":
        from services.inference.model_prep import resolve_model

        tokenizer = Path(resolve_model("embedded:smollm2-135m-instruct", Path(args.model_cache)))
        dummy_model(Path(args.dummy_dir), tokenizer)
    return subprocess.call(steps["command"], cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
