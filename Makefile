# `make test` sets up .venv on a fresh machine and runs the whole suite.
# On a CPU machine torch comes from the pinned CPU build; on a GPU host run
#   make venv TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# Benchmarks are not part of `make test`: `make bench` (the grid), `make bench-batches`
# (StreamBatches against StreamSteps), `make bench-oip` (the Open Inference Protocol
# against StreamSteps), `make bench-store` (durable sessions) and `make bench-path` (what a
# one-step message costs the server against the echo, issue 29) each write their report into
# docs/.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: venv test lint proto train eval serve soak bench bench-batches bench-oip bench-store bench-path bench-gpu clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[server,test]'
	touch $@

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Regenerates the gRPC modules from the .proto (a test fails when they drift).
proto: venv
	$(BIN)/python proto/generate.py

train: venv
	$(BIN)/pip install -q -e '.[train]'
	$(BIN)/lstm-model train --out lstm_model/bundled

eval: venv
	$(BIN)/lstm-model eval

serve: venv
	$(BIN)/lstm-serve

# Not part of `make test`: minutes of load each.
soak: venv
	$(BIN)/python -m bench.soak --minutes 10 --out docs/soak.json

bench: venv
	$(BIN)/python -m bench.run --out-dir docs

# StreamBatches against StreamSteps in one run (about a minute): docs/batches.{json,md}.
bench-batches: venv
	$(BIN)/python -m bench.batches --out-dir docs

# The Open Inference Protocol (64 sequences on one ModelStreamInfer stream, and a stream each)
# against StreamSteps in one run (under a minute): docs/oip.{json,md}.
bench-oip: venv
	$(BIN)/python -m bench.oip --out-dir docs

# Durable sessions (issue 27): what a stored session costs per timestep at several loads and write
# intervals (docs/store_cost.{json,md}, about 2 minutes), then 1,000 / 10,000 / 100,000 live
# sessions on one Redis and on a three-master Redis Cluster, a SIGKILL recovery of all of them,
# and durable against shipped (docs/store.{json,md}, about 8 minutes).
bench-store: venv
	$(BIN)/python -m bench.store_cost --out-dir docs
	$(BIN)/python -m bench.store --pin --out-dir docs

# What a message costs the server (issue 29), against the echo and the model's own compute,
# this tree beside BASELINE (an older checkout: git worktree add --detach /tmp/before COMMIT)
# when given, in one run (about 3 minutes): docs/message_cost.{json,md}.
BASELINE ?=
bench-path: venv
	$(BIN)/python -m bench.message_cost $(if $(BASELINE),--baseline $(BASELINE)) --out-dir docs

bench-gpu:
	bash bench/gpu.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .ruff_cache
