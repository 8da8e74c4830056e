"""``make bench`` / ``make bench-quick``: every benchmark section, then the report.

    python -m bench.run_all [--quick] [--out bench/results] [--sections offline,serve,...]

Each section (bench/sections.py) runs in its own process, one after another, so only one
section's engines are alive at a time (the serve section starts ``vllm serve`` after our
service has stopped; the overhead section keeps two up, the mesh's and the one-process
agent's). Raw figures land in ``<out>/raw/<section>.json``; the report (report.md,
report.json, PNG plots) in ``<out>``. Progress is printed as it runs. A failed section is
reported as failed and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# offline first: the serve and turn sections are read against its rates. overhead runs two
# engines side by side (the mesh's and the one-process agent's), last.
SECTIONS = ("offline", "serve", "turns", "overhead")


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or platform.processor()} x{os.cpu_count()}"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        return out.stdout.strip()
    except OSError:
        return ""


def run_section(name: str, raw: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = raw / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.sections", name, "--out", str(out)]
    if args.quick:
        cmd.append("--quick")
    for flag in ("preset", "device", "model", "load_format"):
        value = getattr(args, flag)
        if value:
            cmd += ["--" + flag.replace("_", "-"), str(value)]
    print(f"\n=== section {name} ({'quick' if args.quick else 'full'}) ===", flush=True)
    began = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        rc = proc.wait(timeout=args.section_timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        print(f"section {name}: cut at {args.section_timeout_s:.0f}s", flush=True)
    data: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if rc != 0 or data.get("partial", not data):
        data["error"] = f"exited {rc} after {time.monotonic() - began:.0f}s" + (
            " (the figures shown are those measured before)" if data else ""
        )
    return data


def main(argv: list[str] | None = None) -> int:
    from bench.assemble import assemble
    from bench.report import write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every section at minimum size")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--sections",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(SECTIONS),
        help="comma-separated subset of " + ",".join(SECTIONS),
    )
    parser.add_argument("--preset", help="lanes preset (default embedded)")
    parser.add_argument("--device", choices=("cpu", "gpu"))
    parser.add_argument("--model", help="a model folder replacing the workhorse lane's model")
    parser.add_argument("--load-format", help="vLLM load_format, e.g. dummy")
    parser.add_argument(
        "--section-timeout-s", type=float, default=900.0, help="a section's wall-time cap"
    )
    parser.add_argument(
        "--from-raw", action="store_true", help="only rebuild the report from <out>/raw"
    )
    args, _unknown = parser.parse_known_args(argv)
    began = time.monotonic()
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    data: dict[str, dict[str, Any]] = {}
    for name in args.sections:
        if args.from_raw:
            path = raw / f"{name}.json"
            if path.exists():
                data[name] = json.loads(path.read_text())
            continue
        data[name] = run_section(name, raw, args)
    meta = {
        "machine": machine(),
        "commit": commit(),
        "size": "quick" if args.quick else "full",
        "preset": args.preset or "embedded",
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "benchmark wall s": round(
            sum(float(d.get("section_wall_s") or 0) for d in data.values())
            if args.from_raw
            else time.monotonic() - began
        ),
    }
    written = write_report(assemble(data), args.out, meta)
    print(f"\nreport: {', '.join(str(p) for p in written[:2])} (+{len(written) - 2} plots)")
    print((args.out / "report.md").read_text())
    failed = [name for name, d in data.items() if d.get("error")]
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
