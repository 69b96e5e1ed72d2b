# Set-up and entry points. `make demo` and `make test` each create .venv when it is absent.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps 'qtawesome>=1.3'  # its icon fonts only (data=icons); not Qt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pretrain demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m benchmarks.step_throughput
	$(BIN)/python -m benchmarks.probe_speed

clean:
	rm -rf runs .pytest_cache build *.egg-info
