# `make demo` and `make test` each set up their own virtual environment first.
# torch is pinned to 2.13.0 so that pip takes the CPU wheel instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DOCS_INSTALLED := $(VENV)/.docs-installed

.PHONY: demo test lint bench docs clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(INSTALLED)

# The main job: the GPT recipe on 4 processes (2 pipelines x 2 stages) with emulated GPUs. Ranks 2-3
# (pipeline 1) are throttled 1.8x during iterations 80-105: a straggler episode.
DEMO_DIR := perseus-demo
demo: $(INSTALLED)
	$(BIN)/torchrun --nproc-per-node 4 recipes/gpt_lightning.py --pp 2 --dp 2 --steps 130 \
		--perseus-config recipes/perseus-cpu.yaml \
		--straggler-rank 2 --straggler-rank 3 --straggler-slowdown 1.8 --straggler-steps 80:105 \
		--summary $(DEMO_DIR)/summary.json --plots $(DEMO_DIR)

test: $(INSTALLED)
	$(BIN)/python -m pytest -q

# Unused imports and variables, undefined names (ruff's pyflakes rules; see pyproject.toml).
lint: $(INSTALLED)
	$(BIN)/ruff check .

# Benchmarks print tables; lowtime 0.3.0 is installed for the side-by-side comparison only.
bench: $(INSTALLED)
	$(BIN)/pip install --quiet lowtime==0.3.0
	$(BIN)/python bench/simulator.py
	$(BIN)/python bench/planner.py
	$(BIN)/python bench/gpu_control.py
	$(BIN)/python bench/profiling.py
	$(BIN)/python bench/overhead.py

# The site's build dependencies (the `docs` extra) go into the same .venv; torch stays at 2.13.0.
$(DOCS_INSTALLED): $(INSTALLED) pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0 -e '.[docs]'
	touch $(DOCS_INSTALLED)

docs: $(DOCS_INSTALLED)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build *.egg-info
