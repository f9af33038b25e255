# advprune set-up: `make quickstart` and `make test` each create or reuse .venv.
# torch is pinned to 2.13.0: on these machines that takes the CPU build already on disk,
# and a plain `torch` would download gigabytes of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.advprune-installed

.PHONY: venv quickstart test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/advprune quickstart --out quickstart_out

# the leaderboard page is tested in headless Chromium (Debian's package), installed where missing
# (with sudo only when not root and sudo exists)
CHROMIUM_SETUP = command -v chromium >/dev/null 2>&1 || { \
	SUDO=; [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null 2>&1 || SUDO=sudo; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP)
	$(CHROMIUM_SETUP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(CHROMIUM_SETUP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) quickstart_out .pytest_cache .ruff_cache test-artifacts
