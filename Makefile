# The two commands a fresh Debian 12 machine needs: `make run` and `make test`.
# Both install what is missing first (Debian packages, libvirtd, .venv) and nothing more.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The virtual environment is rebuilt only when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-16)

.PHONY: run test check docs bench setup host venv compile clean

run: setup
	mkdir -p run var
	$(BIN)/virtnode serve --config packaging/dev.toml

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

check: venv
	$(BIN)/ruff check agent storage network tests bench tools
	tools/typecheck

docs: venv
	$(BIN)/python -m virtnode.apidoc > docs/api.md

bench: setup
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/events.py
	$(BIN)/python bench/vm.py
	$(BIN)/python bench/stats.py
	$(BIN)/python bench/scrape.py
	$(BIN)/python bench/network.py
	$(BIN)/python bench/fuzz.py

setup: host venv compile

# Byte-compile the project, as installing a package does. Where PYTHONDONTWRITEBYTECODE
# is set, every agent start would otherwise compile each module from source (0.15-0.2 s).
compile: venv
	@$(BIN)/python -m compileall -q agent network storage

host:
	@tools/ensure-host

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

clean:
	rm -rf $(VENV) build dist run var *.egg-info
