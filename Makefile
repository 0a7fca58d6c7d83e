# The two quickstart commands (README): `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines pin the local CPU build of torch; a CUDA machine sets CONSTRAINTS= and brings its own.
CONSTRAINTS ?= constraints/cpu.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export DAGSTER_HOME ?= $(CURDIR)/.dagster
export LUMO_OUTPUT_DIR ?= $(CURDIR)/outputs
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

$(BIN)/lumo: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(PIP_CONSTRAINTS) -e '.[dev]'
	touch $(BIN)/lumo

setup: $(BIN)/lumo

demo: setup
	mkdir -p $(DAGSTER_HOME)
	$(BIN)/dagster asset materialize -m lumo_pipeline --select +tokenized_shards
	@echo "Outputs in $(LUMO_OUTPUT_DIR); run history in $(DAGSTER_HOME). See them with: DAGSTER_HOME=$(DAGSTER_HOME) $(BIN)/dagster dev"

test: setup
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

bench: demo
	$(BIN)/lumo bench tokenize
	$(BIN)/lumo bench train

clean:
	rm -rf $(LUMO_OUTPUT_DIR) $(DAGSTER_HOME)
