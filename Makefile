# gpu-agent: `make demo` to see it run, `make test` to check everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := hal sandbox agent coordinator

.PHONY: demo test lint typecheck pytest bench deb clean

$(BIN)/gpu-agent: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/gpu-agent
	@bash scripts/demo.sh

test: lint typecheck pytest

lint: $(BIN)/gpu-agent
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/gpu-agent
	$(BIN)/mypy $(PACKAGES) tests bench scripts

pytest: $(BIN)/gpu-agent
	$(BIN)/python -m pytest -q

bench: $(BIN)/gpu-agent
	$(BIN)/python bench/hal_profile.py
	$(BIN)/python bench/runner.py
	$(BIN)/python bench/link.py
	$(BIN)/python bench/daemon.py
	$(BIN)/python bench/tray.py

deb: $(BIN)/gpu-agent
	$(BIN)/python scripts/build_deb.py --out build/deb

clean:
	rm -rf $(VENV) build *.egg-info
