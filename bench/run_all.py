"""Run every benchmark in turn (``make bench``); each prints its own table and ratios."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    "bench.tools_execute",
    "bench.inference_vs_vllm_serve",
    "bench.turn_latency",
)


def main() -> int:
    failed: list[str] = []
    for module in BENCHMARKS:
        print(f"\n=== {module} ===", flush=True)
        if subprocess.call([sys.executable, "-m", module, *sys.argv[1:]]) != 0:
            failed.append(module)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
