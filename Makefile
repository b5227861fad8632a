# denoq: the two commands of the README.
#   make demo   install, compile the embedded `digits` model at W8A8, sample from ONNX Runtime, evaluate
#   make test   install with the test extras and run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ART    ?= artifacts/digits-w8a8
# torch is pinned to the CPU build in constraints.txt (a looser requirement pulls GBs of CUDA packages)
PIP    := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: install install-dev demo test lint bench

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

# the whole suite, slow end-to-end tests included (~14 min on 2 cores); plain `pytest` runs the fast ones
test: install-dev
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: install-dev
	$(BIN)/ruff check denoq tests tools

bench: install-dev
	$(BIN)/python tools/bench.py
