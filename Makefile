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

# Two test processes, each module whole in one of them (its Ray and fixtures are per module):
# much of an end-to-end test is waiting on processes starting and on Ray's polls, so a second
# process fills the cores (pytest-xdist); a third made it no faster. Modules are handed out in
# collection order, the longest first (tests/conftest.py). TEST_WORKERS=0 runs them in this
# process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

# Each script merges its figures into bench/latest.json and keeps its full report in bench/logs/;
# the table at the end prints every figure the file holds. PYTHONPATH: Ray's workers import this
# checkout too, not whatever the venv points at.
BENCH_JSON ?= bench/latest.json
BENCH_LOGS := bench/logs
BENCH_ENV := PYTHONPATH=$(CURDIR)

bench: $(STAMP)
	@mkdir -p $(BENCH_LOGS)
	@for s in "pseudo_label.py" "train_epoch.py" "augment.py" "reduced_decode.py" "prepare.py" "s3.py" "depthwise.py" "fit_startup.py"; do \
	  echo "bench/$$s ... (report: $(BENCH_LOGS)/$${s%.py}.log)"; \
	  $(BENCH_ENV) $(BIN)/python bench/$$s --json $(BENCH_JSON) > $(BENCH_LOGS)/$${s%.py}.log 2>&1 \
	    || { tail -20 $(BENCH_LOGS)/$${s%.py}.log; exit 1; }; \
	done
	@$(BENCH_ENV) $(BIN)/python bench/table.py --json $(BENCH_JSON)
