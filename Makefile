# Two commands on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := .demo

.PHONY: demo test lint deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs only the Proxmox extra (its hypervisor is the project's Proxmox API double) and
# openssl; the Makefile is a prerequisite so that a venv made for an older demo gets the extra.
$(VENV)/.installed-demo: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q -e '.[proxmox]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	scripts/install-system-deps test
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## make demo: the Proxmox VE API double (standalone, HTTPS) with three VMs: prune, snapshot --all in
## parallel (stand-in guest services), status, and the listings with the new snapshots
demo: $(VENV)/.installed-demo
	scripts/demo $(BIN) $(DEMO)

## make test: the whole suite against real components (installs and starts what it needs)
test: $(VENV)/.installed-dev
	tests/vcsim/build.sh
	$(BIN)/python -m pytest --cov --cov-report=term $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/typecheck

clean:
	rm -rf $(VENV) $(DEMO) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
