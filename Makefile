# The two commands of the README: `make run` and `make test`. Each makes its own virtualenv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run serve test lint tools bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# The main job: a daemon on a temporary SQLite file and a simulated fleet (about 60 s).
run: $(STAMP)
	$(VENV)/bin/execwatch demo

serve: $(STAMP)
	$(VENV)/bin/execwatch serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Debian's prometheus package brings promtool and prometheus (2.42): the metrics, rule and
# live dashboard tests run them.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
			prometheus >/dev/null; }

test: lint tools
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/pushgateway.py
	$(PY) bench/detection.py
	$(PY) bench/exporting.py
	$(PY) bench/durability.py
	$(PY) bench/stream.py
	$(PY) bench/sdk.py
	$(PY) bench/memory.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache
