# Every target that runs code depends on `setup`, which builds .venv once (idempotent: a stamp file
# keyed on pyproject.toml and the lock decides whether anything needs installing).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ROOT ?= runs/demo
PORT ?= 4200
STAMP := $(VENV)/.ppd-installed
export DS_ACCELERATOR ?= cpu
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# torch's OpenMP threads otherwise spin while waiting: on a busy 2-core machine a step got 10x slower
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test test-slow lint bench docs gpu-check clean ui serve

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24"
	# torch first, pinned: an unpinned resolve would pull a newer multi-GB build
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# deepspeed's build imports the installed torch, so no build isolation
	$(BIN)/pip install -q --no-build-isolation -c requirements/constraints.txt deepspeed==0.19.8
	$(BIN)/pip install -q -c requirements/constraints.txt -e ".[dev,dask]"
	# DeepSpeed's CPU shared-memory comm op is a JIT g++ build (28 s, 1.6 GiB peak for the compiler): do it at install time, not in the
	# middle of the first training stage (where it raised the first demo's peak memory from 4.4 to 6.7 GiB)
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/ppd run --root $(ROOT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=15

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/bench_embed.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_train_joint.py
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_cli.py
	$(BIN)/python benchmarks/bench_partitions.py
	$(BIN)/python benchmarks/bench_dask_embed.py
	# kill -9 at seeded moments within ingest, embed, train and evaluate, then rerun; two runs on one root (small settings)
	$(BIN)/python benchmarks/bench_faults.py
	# new-user quality on world seeds 0, 1, 2, each trained with train.seed 0, 1, 2 and its targets judged on the three
	# runs pooled (one training run moves a new-user win rate by up to 0.15): about an hour on 2 cores, Stage 1 shared
	$(BIN)/python benchmarks/bench_quality.py --train-seeds 0 1 2 --out benchmarks/results/quality_train_seeds.json

# Prefect dashboard for $(ROOT) on 127.0.0.1:$(PORT) (SQLite under $(ROOT)/.prefect, earlier runs included);
# while it runs, every ppd command on that root reports to it. Ctrl-C stops it.
ui: setup
	$(BIN)/ppd ui --root $(ROOT) --port $(PORT)

# The deployments of deploy/prefect.yaml on their cron schedules, run by this process (uses the server of
# `make ui` when it answers, else starts one); creates the `gpu` concurrency limit when missing.
serve: setup
	$(BIN)/ppd serve --root $(ROOT) --port $(PORT)

# On a CUDA machine: SD 1.5-sized adapter training through DeepSpeed (bf16); prints pairs/s and peak memory.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

docs: setup
	$(BIN)/ppd config reference --write README.md

clean:
	rm -rf runs .pytest_cache
