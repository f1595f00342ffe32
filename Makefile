# `make demo` and `make test` each set up their own virtual environment first.
# torch is pinned to 2.13.0 so that pip takes the CPU wheel instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/perseus demo

test: $(INSTALLED)
	$(BIN)/python -m pytest -q

# Benchmarks print tables; lowtime 0.3.0 is installed for the side-by-side comparison only.
bench: $(INSTALLED)
	$(BIN)/pip install --quiet lowtime==0.3.0
	$(BIN)/python bench/simulator.py
	$(BIN)/python bench/planner.py
	$(BIN)/python bench/gpu_control.py

clean:
	rm -rf $(VENV) build *.egg-info
