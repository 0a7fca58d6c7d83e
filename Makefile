# The two quickstart commands (README): `make demo` and `make test`. Both are idempotent.
# For the edit-test loop: `make test-fast` (no services, a few minutes) and `make lint`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines pin the local CPU build of torch; a CUDA machine sets CONSTRAINTS= and brings its own.
CONSTRAINTS ?= constraints/cpu.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
# The demo keeps its instance and outputs in the project folder; the tests make their own.
DEMO_ENV := DAGSTER_HOME=$${DAGSTER_HOME:-$(CURDIR)/.dagster} LUMO_OUTPUT_DIR=$${LUMO_OUTPUT_DIR:-$(CURDIR)/outputs}
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint format bench clean

$(BIN)/lumo: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(PIP_CONSTRAINTS) -e '.[dev]'
	touch $(BIN)/lumo

setup: $(BIN)/lumo

# The instance gets the quickstart's dagster.yaml (no UI pop-up, no telemetry notice) unless it has
# its own. `dg launch` (Dagster's recommended command; `dagster asset materialize -m lumo_pipeline
# --select +tokenized_shards` does the same) writes its DEBUG stream to $DAGSTER_HOME/demo.log; the
# terminal shows one line per step and check, the result and where to look (scripts/demo_summary.py).
demo: setup
	@$(DEMO_ENV) sh -c 'mkdir -p "$$DAGSTER_HOME" && \
	  { test -f "$$DAGSTER_HOME/dagster.yaml" || cp scripts/quickstart/dagster.yaml "$$DAGSTER_HOME/"; } && \
	  $(BIN)/python scripts/demo_summary.py --log "$$DAGSTER_HOME/demo.log" -- \
	    $(BIN)/dg launch -m lumo_pipeline --assets "+tokenized_shards"'

# Tests build their own instances and output folders: settings of the caller's shell must not leak in.
test: setup
	env -u DAGSTER_HOME -u LUMO_OUTPUT_DIR -u LUMO_MANIFEST -u LUMO_UTI_CONFIG -u LUMO_TRAIN_CONFIG \
	  $(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# The unit tier: no PostgreSQL, Redis, Chromium or Docker, and none of the tests that start real
# processes end to end (markers `integration` and `slow`, pyproject.toml).
test-fast: setup
	env -u DAGSTER_HOME -u LUMO_OUTPUT_DIR -u LUMO_MANIFEST -u LUMO_UTI_CONFIG -u LUMO_TRAIN_CONFIG \
	  $(BIN)/python -m pytest -n 2 --dist loadfile -m "not integration and not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: demo
	$(DEMO_ENV) $(BIN)/lumo bench tokenize
	$(DEMO_ENV) $(BIN)/lumo bench train

clean:
	rm -rf outputs .dagster
