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

demo: setup
	$(VENV)/bin/snapgen run recipes/paper.toml --dry-run
	$(VENV)/bin/snapgen bench-device --ablation-ladder
	$(VENV)/bin/snapgen bench-device --model unet --preset snapgen-t2i --resolution 512 --runs 3 --compare sdxl-unet

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_unet_latency.py

clean:
	rm -rf $(VENV) runs .pytest_cache
