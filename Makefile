# Two commands: `make demo` (set up, train, serve, query) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test lint demo stop

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
	$(BIN)/python -m pytest -q

demo: setup
	./scripts/demo.sh

stop:
	@if [ -f .demo/server.pid ]; then kill $$(cat .demo/server.pid) 2>/dev/null && echo "stopped"; rm -f .demo/server.pid; else echo "no demo server"; fi
