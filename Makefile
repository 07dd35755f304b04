# Pipeline Service. `make run` starts the local stack; `make test` runs every check. Both install what
# they need first (virtualenvs, pinned packages, the emulator's offline DuckDB extension).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BQE_VENV := .venv-bqemulator
FOCUS_VENV := .venv-focus
# focus-validator 2.2.1 (a test tool) needs Python 3.12: the newest pyenv 3.12, else python3.12 on PATH.
FOCUS_PYTHON ?= $(or $(shell ls -d $(HOME)/.pyenv/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V | tail -n 1),python3.12)
PY := $(VENV)/bin/python
BQE_HOME := .state/bqemulator/home
SPATIAL := $(BQE_HOME)/.duckdb/extensions/v1.5.5/linux_amd64/spatial.duckdb_extension
PROTOS := $(shell cd proto && find cloudact -name '*.proto' | sort)
PIP_FLAGS := --disable-pip-version-check -q

.PHONY: help install run test pytest fuzz lint gen gen-check buf-breaking bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -U 'pip>=24'
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev]'
	touch $@

$(BQE_VENV)/.installed:
	test -x $(BQE_VENV)/bin/python || $(PYTHON) -m venv $(BQE_VENV)
	$(BQE_VENV)/bin/pip install $(PIP_FLAGS) 'bqemulator==1.4.0' 'duckdb==1.5.5' \
		'duckdb-extension-spatial==1.5.5' 'numpy>=2,<3'
	touch $@

# bqemulator runs `INSTALL spatial` at start; offline that only works from DuckDB's extension folder,
# which HOME decides, so the file from the PyPI wheel goes into a project-owned HOME.
$(SPATIAL): $(BQE_VENV)/.installed
	mkdir -p $(BQE_HOME)
	HOME=$(abspath $(BQE_HOME)) $(BQE_VENV)/bin/python -c "import duckdb, glob, os, \
		duckdb_extension_spatial as m; \
		duckdb.connect().execute(\"INSTALL '%s'\" % glob.glob(os.path.dirname(m.__file__) \
		+ '/extensions/*/spatial.duckdb_extension')[0])"
	test -f $@

# The FinOps Foundation's FOCUS validator for the FOCUS 1.2 tests; its declared pins do not resolve to a
# working set, hence numpy<2 and pyarrow<18 (tests/focus_validator.py installs the same when make did not).
$(FOCUS_VENV)/.installed:
	test -x $(FOCUS_VENV)/bin/python || $(FOCUS_PYTHON) -m venv $(FOCUS_VENV)
	$(FOCUS_VENV)/bin/python -m pip install $(PIP_FLAGS) 'focus-validator==2.2.1' 'numpy<2' 'pyarrow<18'
	touch $@

install: $(VENV)/.installed $(SPATIAL) $(FOCUS_VENV)/.installed ## create the virtualenvs and install everything

run: install ## start emulator, gRPC server and Envoy in the foreground (Ctrl-C stops all)
	$(VENV)/bin/pipeline-service dev

gen: $(VENV)/.installed ## regenerate the Python stubs and Envoy's descriptor set from proto/
	bash scripts/gen.sh .

gen-check: $(VENV)/.installed ## fail if the committed stubs differ from what `make gen` produces
	rm -rf .state/gen-check && mkdir -p .state/gen-check
	bash scripts/gen.sh .state/gen-check
	diff -r cloudact .state/gen-check/cloudact
	cmp gen/api_descriptor.pb .state/gen-check/gen/api_descriptor.pb

buf-breaking: $(VENV)/.installed ## compare the contracts with main (when main has them)
	@if git rev-parse -q --verify main >/dev/null && git ls-tree -r --name-only main | grep -q '^proto/'; then \
		$(VENV)/bin/buf breaking --against '.git#branch=main'; \
	else echo "buf breaking: main has no protos yet"; fi

lint: $(VENV)/.installed ## ruff, mypy --strict, buf lint
	$(VENV)/bin/ruff check server processors tests bench
	$(VENV)/bin/ruff format --check server processors tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/buf lint

pytest: install
	$(VENV)/bin/pytest

test: install gen-check lint buf-breaking pytest ## every check and the whole test suite

fuzz: install ## the fuzz tests with 3,000 examples per property (FUZZ_SEED=n for other inputs)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-3000} $(VENV)/bin/pytest tests/integration/test_fuzz.py -p no:cacheprovider

bench: install ## run the benchmarks in bench/
	$(VENV)/bin/python -m bench

clean: ## remove virtualenvs and local state
	rm -rf $(VENV) $(BQE_VENV) $(FOCUS_VENV) .state
