# cti-bridge: every target sets up .venv itself (Python 3.11 and PyPI are all it needs).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin

.PHONY: install test lint typecheck unit run demo bench bench-templates bench-transport bench-retention clean

$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check cti_bridge tests bench
	$(BIN)/ruff format --check cti_bridge

typecheck: install
	$(BIN)/mypy cti_bridge

test: lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider

run: install
	$(BIN)/cti-bridge run

demo: install
	$(BIN)/cti-bridge demo

bench: install
	$(BIN)/python bench/bench_templates.py
	$(BIN)/python bench/bench_e2e.py
	$(BIN)/python bench/bench_retention.py

bench-templates: install
	$(BIN)/python bench/bench_templates.py

bench-retention: install
	$(BIN)/python bench/bench_retention.py

bench-transport: install
	$(BIN)/python bench/bench_transport.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
