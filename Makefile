# Two commands on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := .demo

.PHONY: demo test lint deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	scripts/install-system-deps demo
	$(BIN)/pip install -q -e '.[libvirt]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	scripts/install-system-deps test
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## make demo: snapshot a VM of libvirt's built-in test hypervisor, bracketed by (stand-in) services
demo: $(VENV)/.installed-demo
	rm -rf $(DEMO) && mkdir -p $(DEMO)/state
	touch $(DEMO)/state/apache2.running $(DEMO)/state/cron.running $(DEMO)/state/mariadb.running
	sed -e "s|@STATE@|$(CURDIR)/$(DEMO)/state|g" -e "s|@EXAMPLES@|$(CURDIR)/examples|g" \
	    examples/demo.toml.in > $(DEMO)/snapcoord.toml
	$(BIN)/snapcoord -c $(DEMO)/snapcoord.toml config check
	$(BIN)/snapcoord -c $(DEMO)/snapcoord.toml snapshot demo-db --dry-run
	$(BIN)/snapcoord -c $(DEMO)/snapcoord.toml snapshot demo-db
	$(BIN)/snapcoord -c $(DEMO)/snapcoord.toml list demo-db

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
