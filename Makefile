# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch and torchvision releases that pip installs from this machine's local wheels; the
# ranges in pyproject.toml accept them, so pip does not fetch a different build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO_ROOT ?= .
DEMO_RUN ?= demo

.PHONY: venv demo test test-fast lint bench clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py --root $(DEMO_ROOT) --run $(DEMO_RUN)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/pseudo_label.py
	$(BIN)/python bench/train_epoch.py --json bench/latest.json
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/s3.py
