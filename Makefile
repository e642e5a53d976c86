# Two commands on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := .demo

.PHONY: demo test test-fast lint deps clean install uninstall

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

## make install: as root, snapcoord in a venv at /opt/snapcoord, linked as /usr/local/bin/snapcoord,
## with its man page and bash completion (scripts/install, docs/install.md); again to upgrade.
## EXTRAS=proxmox,vsphere,libvirt (default: all), WHEELHOUSE=DIR to install offline
install:
	scripts/install $(if $(EXTRAS),--extras $(EXTRAS)) $(if $(WHEELHOUSE),--wheelhouse $(WHEELHOUSE))

## make uninstall: remove what `make install` made (never /etc/snapcoord or the store)
uninstall:
	scripts/install --uninstall

# Test workers: each runs in a lab sandbox of its own (tests/lab/sandbox.py); most of a test's
# time is waiting, so more workers than cores pay off (docs/testing.md has the measurements).
WORKERS ?= 4

## make test: the whole suite against real components, in parallel lab sandboxes that never
## touch this machine's own services (installs what it needs; what CI runs). The tests that
## drive QEMU (a TCG-emulated Debian guest) run beside the others, as one group on one worker.
test: $(VENV)/.installed-dev
	tests/vcsim/build.sh
	$(BIN)/python -m pytest -n $(WORKERS) --durations=25 --cov --cov-report=term $(PYTEST_ARGS)

## make test-fast: every test that needs no real service (no guest, no database, no QEMU, no
## vcsim), for the edit loop
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n 4 -m "not real and not realvm" $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/typecheck

clean:
	rm -rf $(VENV) $(DEMO) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
