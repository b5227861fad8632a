# denoq: the two commands of the README.
#   make demo   install, compile the embedded `digits` model at W8A8, sample from ONNX Runtime, evaluate
#   make test   install with the test extras and run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ART    ?= artifacts/digits-w8a8
# constraints.txt locks the whole tested dependency set (torch the CPU build: a looser requirement pulls GBs of CUDA
# packages); demo, test and CI install exactly it
PIP    := $(BIN)/python -m pip install -q -c constraints.txt
LATEST ?= .venv-latest

.PHONY: install install-dev demo test lint bench try-latest lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) -e .

install-dev: $(BIN)/python
	$(PIP) -e ".[dev]"

demo: install
	$(BIN)/denoq compile digits --recipe w8a8 --out $(ART) --force
	$(BIN)/denoq sample $(ART) --backend ort --sampler ddim --steps 50 --n 64 --out $(ART)-grid.png --force
	$(BIN)/denoq eval $(ART)
	@echo "open $(ART)/report.html for the pictures; the ORT sample grid is $(ART)-grid.png"

# the whole suite, slow end-to-end tests included, on two pytest workers, one test file each at a time (~20 min on
# 2 cores; each worker computes with one torch thread); plain `pytest` runs the fast ones in one process
test: install-dev
	$(BIN)/python -m pytest -q -m "slow or not slow" -n 2 --dist loadfile

lint: install-dev
	$(BIN)/ruff check denoq tests tools

bench: install-dev
	$(BIN)/python tools/bench.py

# the newest releases of every dependency (torch stays the CPU build) in $(LATEST): prints what differs from the lock,
# then runs the whole suite there; `make lock` afterwards writes the versions of .venv into constraints.txt
try-latest:
	$(PYTHON) -m venv $(LATEST)
	echo "torch==$$(sed -n 's/^torch==//p' constraints.txt)" > $(LATEST)/torch-only.txt
	$(LATEST)/bin/python -m pip install -q --upgrade -c $(LATEST)/torch-only.txt -e ".[dev]"
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed 's/+cpu$$//' | sort -f \
	  > $(LATEST)/freeze.txt
	@echo "== versions that differ from constraints.txt (< locked, > newest) =="
	@grep -v '^#' constraints.txt | sort -f | diff - $(LATEST)/freeze.txt | grep '^[<>]' || echo "none"
	$(LATEST)/bin/python -m pytest -q -m "slow or not slow" -p no:cacheprovider -n 2 --dist loadfile

lock: install-dev
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --all --exclude-editable | grep -v '^pip==' \
	  | sed 's/+cpu$$//' | sort -f; } > constraints.tmp
	mv constraints.tmp constraints.txt
