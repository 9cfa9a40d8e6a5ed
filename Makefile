# One command each, on a fresh machine: `make demo` (set up + run the main job), `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.snapgen-installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

# torch 2.14.1 / torchvision 0.29.1 are pinned in pyproject.toml (see the note there).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The embedded default: the paper's stage sequence at toy scale on this CPU (runs/demo/report.md).
demo: setup
	$(VENV)/bin/snapgen run

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/snapgen bench-device --ablation-ladder --out runs/bench/ladder
	$(PY) benchmarks/bench_latency.py --resolution 512 --runs 3
	$(PY) benchmarks/bench_latency.py --model decoder --preset snapgen-decoder --baseline sd3-decoder --resolution 512 1024 --runs 2
	$(PY) benchmarks/bench_train_throughput.py --runs 3

clean:
	rm -rf $(VENV) runs .pytest_cache
