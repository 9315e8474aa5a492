# The two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both set up a virtual environment from the hash-pinned lock file first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed-stamp

.PHONY: setup postgres demo test lint lock bench clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip sync --quiet --python $(BIN)/python --require-hashes requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/qmachina demo

# The store's tests run against a real PostgreSQL (and SQLite); start the local cluster if down.
postgres:
	@pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@pg_isready -h 127.0.0.1 -p 5432

# Test files run in parallel, one file per worker at a time (each file's fixtures are shared by
# its tests), on as many workers as cores, at most four.
test: setup postgres
	$(BIN)/python -m pytest --numprocesses auto --maxprocesses 4 --dist loadfile

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/qmachina config validate

bench: setup
	$(BIN)/python bench/engine.py --events 5000000 --json
	$(BIN)/python bench/sweep_core.py --json

lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --generate-hashes --no-header -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
