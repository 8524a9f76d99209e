# Two commands from a fresh clone: `make up` (the whole stack on embedded defaults) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv tools up test lint unit bench chaos clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# promtool and prometheus (Debian's package, unpacked into .venv/prometheus) for the alert-rule tests;
# without apt-get it says why and the tests that need them skip.
tools: venv
	@bash deployments/prometheus/install_tools.sh

up: venv
	$(BIN)/python -m deployments.up

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint tools
	$(BIN)/pytest -q -rs -p no:cacheprovider --durations=25

unit: venv
	$(BIN)/pytest -q tests/unit

bench: venv
	$(BIN)/python -m bench

# The chaos run of `make test` (tests/integration/chaos.py), each fault phase CHAOS_PHASE_S long (default 60 s:
# about 8 minutes); CHAOS_SEED replays a run.
chaos: venv
	CHAOS_PHASE_S=$${CHAOS_PHASE_S:-60} $(BIN)/pytest -q -s -p no:cacheprovider tests/integration/test_chaos.py

# Refresh the lock after changing dependencies in pyproject.toml (then run `make test`).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q -e '.[dev]'
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
