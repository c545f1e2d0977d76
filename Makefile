# gpu-agent: `make demo` to see it run, `make test` to check everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := hal sandbox keyfile oci agent coordinator

.PHONY: demo test lint typecheck pytest unit bench deb lock clean llama-image

# Every dependency comes from requirements*.txt: the whole tree pinned, with hashes.
# pyproject.toml keeps the ranges for people who install the package; `make lock` pins anew.
LOCKED := $(BIN)/pip install --quiet --require-hashes --only-binary :all:

$(VENV)/.run: pyproject.toml requirements-build.txt requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(LOCKED) -r requirements-build.txt
	$(LOCKED) -r requirements.txt
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.test: $(VENV)/.run requirements-test.txt
	$(LOCKED) -r requirements-test.txt
	touch $@

# The lock is universal (every platform, Python 3.11 and newer), made by a pinned uv.
UV_COMPILE := .venv-lock/bin/uv pip compile --quiet --universal --python-version 3.11 \
	--generate-hashes --no-header

lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --require-hashes -r requirements-tools.txt
	$(UV_COMPILE) --upgrade requirements-tools.in -o requirements-tools.txt
	$(UV_COMPILE) --upgrade requirements-build.in -o requirements-build.txt
	$(UV_COMPILE) --upgrade pyproject.toml -o requirements.txt
	$(UV_COMPILE) --upgrade pyproject.toml --extra tray -o requirements-tray.txt
	$(UV_COMPILE) --upgrade pyproject.toml --extra test --extra tray -o requirements-test.txt
	rm -rf .venv-lock

demo: $(VENV)/.run
	@bash scripts/demo.sh

test: lint typecheck pytest

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.test
	$(BIN)/mypy $(PACKAGES) tests bench scripts

pytest: $(VENV)/.test
	$(BIN)/python -m pytest -q

# The tests that need no Docker engine, websocket or gcc (tests/conftest.py holds them to it).
unit: $(VENV)/.test
	$(BIN)/python -m pytest -q tests/unit

bench: $(VENV)/.test
	$(BIN)/python bench/hal_profile.py
	$(BIN)/python bench/runner.py
	$(BIN)/python bench/link.py
	$(BIN)/python bench/daemon.py
	$(BIN)/python bench/tray.py
	$(BIN)/python bench/pull.py
	$(BIN)/python bench/input_fetch.py
	$(BIN)/python bench/upload.py
	$(BIN)/python bench/tunnel.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/llama_direct.py
	$(BIN)/python bench/service_start.py

# The llama-server test image, built from source once per machine (tests/support/llama.py).
llama-image: $(VENV)/.test
	$(BIN)/python scripts/build_llama_image.py

# Both packages: gpu-agent (the service) and gpu-agent-tray (the tray and its Qt).
deb: $(VENV)/.test
	$(BIN)/python scripts/build_deb.py --out build/deb

clean:
	rm -rf $(VENV) .venv-lock build *.egg-info
