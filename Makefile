# Two commands: `make demo` (set up, train, serve, query) and `make test` (the whole suite);
# `make test-fast` is the edit-run loop: unit and in-process API tests, nothing marked slow.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# four pytest sessions, each test file on one of them, so module fixtures (a served app, a
# real server, a fit) are made once; four even on two cores, since many tests spend their
# time waiting on a server or a worker process; plain `pytest` still runs in one process
PARALLEL ?= -n 4 --dist loadfile

.PHONY: setup test test-fast lint demo stop

$(BIN)/.installed: pyproject.toml
	@echo ">> creating $(VENV) and installing the project (torch 2.14.1, torchvision 0.29.1)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e '.[dev]'
	@touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check .

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PARALLEL)

test-fast: setup
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not slow" tests/unit tests/api tests/deploy

demo: setup
	./scripts/demo.sh

stop:
	@if [ -f .demo/server.pid ]; then kill $$(cat .demo/server.pid) 2>/dev/null && echo "stopped"; rm -f .demo/server.pid; else echo "no demo server"; fi
