# The README's two commands: `make demo` and `make test` (`make test-fast` is the inner loop). Each
# creates .venv when it is missing and installs torch==2.13.0 (the CPU wheel) before anything
# else, so nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedgov-installed
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: demo test test-fast lint format install clean postgres chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedgov demo

# ruff, then the import layers of .importlinter (README: Layout) with import-linter.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The registry's PostgreSQL test starts a throwaway server from Debian's binaries: install them
# when absent (CI runs as root on a clean machine); without root the test skips, saying why.
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing PostgreSQL (Debian package) for the registry's PostgreSQL test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends postgresql >/dev/null; \
	else \
		echo "note: PostgreSQL server binaries are absent and this is not root:" \
			"the registry's PostgreSQL test will skip"; \
	fi

# The privacy report's and the console's rendering tests open pages in headless Chromium (Debian's
# chromium package) and read the console's PDF with pdftotext (poppler-utils): install them when
# absent (CI runs as root); without root those tests skip.
chromium:
	@if { [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; } && \
		command -v pdftotext >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Chromium and poppler-utils (Debian packages) for the rendering tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium fonts-dejavu-core poppler-utils >/dev/null; \
	else \
		echo "note: chromium or pdftotext is absent and this is not root:" \
			"the rendering tests will skip"; \
	fi

# CI (.ci/run): every tier, the 15 slowest tests listed, a hung test failed by pytest-timeout
# (the default in pyproject.toml).
test: lint postgres chromium
	$(BIN)/python -m pytest -q -ra --durations=15

# The inner loop: no test that starts processes, Ray, PostgreSQL or Chromium, or is marked slow
# (tiers: tests/conftest.py).
FAST_TIERS := not slow and not process and not ray and not external
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=10 -m "$(FAST_TIERS)"

clean:
	rm -rf $(VENV) demo-output outputs multirun .pytest_cache .ruff_cache
