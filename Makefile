# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BLOODCELL := $(VENV)/bin/bloodcell
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: setup demo test test-fast bench clean default-model detector gpu-check labs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[train,dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import bloodcell, torch, torchvision, timm, lightning" 
	touch $(STAMP)

setup: $(STAMP)

# The demo: the study pipeline on the embedded sample (tiny models from scratch), then the bundled model, trained on
# the full PBC dataset, scoring and counting the same 200 images, which lie in its test part (it never saw them).
demo: $(STAMP)
	$(BLOODCELL) study configs/demo.yaml --out $(DEMO_OUT)
	@echo "== the bundled model on the sample: accuracy with its CI, then the differential count =="
	$(BLOODCELL) evaluate examples/pbc-sample --model default --out $(DEMO_OUT)/bundled-model
	$(BLOODCELL) predict examples/pbc-sample --format summary
	@echo "reports: $(DEMO_OUT)/report.html (study)  $(DEMO_OUT)/bundled-model/report.md (bundled model)"

test: $(STAMP)
	$(VENV)/bin/ruff format --check src tests benchmarks tools
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(PY) -m pytest -q

# Retrain the bundled model on PBC (PBC=path) and BCCD's white cells (BCCD=path), scored on the Tecom cells it never
# sees (TECOM=path), then copy it into the package with the leave-one-lab-out study's tables in its card (run `make labs`
# first for those; without runs/labs the card leaves them out).
PBC ?= ../shared/data/pbc
BCCD ?= ../shared/data/bccd
TECOM ?= ../shared/data/external/tecom_zheng2018
default-model: $(STAMP)
	$(BLOODCELL) train configs/default-model.yaml --data $(PBC) --out runs/default-model --resume \
		--set "data.labs=[{name: bccd, root: $(BCCD)}]" --set "eval.labs=[{name: tecom, root: $(TECOM)}]"
	$(PY) tools/bundle_model.py runs/default-model src/bloodcell/assets/default_model $$([ -f runs/labs/study.yaml ] && echo --labs-study runs/labs)

# The leave-one-lab-out study (docs/labs.md): PBC, BCCD and Tecom, each held out in turn. Its config names the labs'
# folders under ../shared/data (one row trains on Tecom and BCCD instead of PBC): edit it for copies elsewhere.
labs: $(STAMP)
	$(BLOODCELL) study configs/labs.yaml --out runs/labs

# Refit the bundled smear-photograph detector (docs/fields.md), then copy it into the package: stage 1 from scratch on
# BCCD, stage 2 from its weights on every lab of TXL-PBC plus BCCD; the leave-one-source-out runs go on its card.
TXL ?= ../shared/data/txl_pbc
BCCD ?= ../shared/data/bccd
DETECTOR_SETS = --set data.sets.txl_pbc.root=$(TXL) --set data.sets.bccd.root=$(BCCD)
LOSO_SOURCES ?= raabin pbc bcd
detector: $(STAMP)
	$(BLOODCELL) detector train configs/detector-fcos.yaml --data $(BCCD) --out runs/detector-bccd --resume
	$(BLOODCELL) detector train configs/detector.yaml $(DETECTOR_SETS) --out runs/detector-lab --resume
	for s in $(LOSO_SOURCES); do $(BLOODCELL) detector train configs/detector-loso.yaml $(DETECTOR_SETS) --set data.leave_out=$$s --out runs/detector-loso-$$s --resume || exit 1; done
	$(PY) tools/bundle_detector.py runs/detector-lab src/bloodcell/assets/default_detector --check-photos $(TXL)/images/test \
		--loso $(addprefix runs/detector-loso-,$(LOSO_SOURCES))

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/cache_build.py examples/pbc-sample
	$(PY) benchmarks/inference.py --arch cnn --size 64

# The GPU check (docs/benchmarks.md): what a lent GPU session runs, prepared and rehearsed here. Downloads the wheels
# and packs PBC into .devpack/ (needs PyPI and ../shared; the pack only once), then runs the check at toy scale on
# the CPU. On the GPU machine itself the command is `bash tools/gpu_check.sh`, with no make and no .venv.
gpu-check: $(STAMP)
	PY=$(PY) bash tools/gpu_check_wheels.sh
	PY=$(PY) bash tools/gpu_check.sh --dry-run runs/gpu-check-dry

clean:
	rm -rf $(VENV) runs .pytest_cache
