# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BLOODCELL := $(VENV)/bin/bloodcell
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import bloodcell, torch, torchvision, timm, lightning" 
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BLOODCELL) study configs/demo.yaml --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/cache_build.py examples/pbc-sample
	$(PY) benchmarks/inference.py --arch cnn --size 64

clean:
	rm -rf $(VENV) runs .pytest_cache
