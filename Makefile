# conveyor: the two set-up commands are `make demo` and `make test`; both build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench chaos load fuzz clean venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=25.1" "setuptools>=78.1.1"
	$(BIN)/python -m pip install -q -e ".[redis,server]" --group test --group lint
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m conveyor.demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/brokers.py

# Every chaos scenario at full counts, the control-race state machine at length, then a
# 30-minute soak with periodic worker kills; one table out.
chaos: $(STAMP)
	CONVEYOR_HYPOTHESIS_EXAMPLES=20 $(BIN)/python -m pytest -q tests/chaos/test_control_races.py
	$(BIN)/python -m conveyor.testing.chaos --full --soak-minutes 30 $(CHAOS_ARGS)

# Hypothesis at length, >= 10,000 schemathesis cases (stateful links included) against a real
# server, and 1,000,000 atheris runs each on the payload codec and the JSON-RPC envelope.
fuzz: $(STAMP)
	$(BIN)/python -m pip install -q --group fuzz
	CONVEYOR_FUZZ_EXAMPLES=1000 $(BIN)/python -m pytest -q tests/fuzz
	$(BIN)/python fuzz/schemathesis_run.py
	$(BIN)/python fuzz/atheris_codec.py -runs=1000000
	$(BIN)/python fuzz/atheris_jsonrpc.py -runs=1000000

# T1-T8 of the load plan (T6, the soak, is in `make chaos`); one table out.
load: $(STAMP)
	$(BIN)/python bench/load.py $(LOAD_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
