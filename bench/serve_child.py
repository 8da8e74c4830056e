"""Our inference service in its own process, the way the serve benchmark measures it:

    python -m bench.serve_child --port P [--kvcache-gib N] [--max-concurrency C]
        [--preset embedded] [--device cpu] [--model DIR] [--load-format dummy]

The workhorse lane only (bench.sections.workhorse: the lane's engine arguments, the dtype
chosen for the machine), served by the production bootstrap (shared.server.run_service:
uvloop, the interceptor chain, health) until SIGTERM, exactly as ``python -m
services.inference`` serves it. ``vllm serve`` runs in its own process the same way, and
the benchmark client in a third.
"""

from __future__ import annotations

import argparse

from bench.sections import workhorse
from services.inference.service import InferenceService
from shared.server import run_service


def main() -> int:
    parser = argparse.ArgumentParser(description="the inference service for the benchmark")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kvcache-gib", type=int, default=1)
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--preset", default="embedded")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--model")
    parser.add_argument("--load-format")
    args = parser.parse_args()
    bl = workhorse(args, host="127.0.0.1", port=args.port, metrics_port=0)
    bl.lanes.lanes["workhorse"].max_concurrency = args.max_concurrency
    return run_service(InferenceService(bl.settings, bl.lanes), bl.settings)


if __name__ == "__main__":  # vLLM spawns its engine-core process: keep the guard
    raise SystemExit(main())
