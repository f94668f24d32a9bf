# The two commands a fresh Debian 12 machine needs: `make run` and `make test`.
# Both install what is missing first (Debian packages, libvirtd, .venv) and nothing more.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The development install is a link tree (setuptools' strict editable mode) under build/:
# the package as Python, mypy, import-linter and editors see it, each file a link to its
# source. It is rebuilt when pyproject.toml changes or a package file is added or removed.
PACKAGE_FILES := $(shell find agent storage network api_schema -name '*.py' -o -name '*.yaml' -o -name schema.json -o -name py.typed | sort)
STAMP := $(VENV)/.installed-$(shell { cat pyproject.toml; echo $(PACKAGE_FILES); } | sha1sum | cut -c1-16)
LINK_TREE = $(wildcard build/__editable__.virtnode-*)

.PHONY: run test check docs bench setup host venv compile web clean

run: setup
	mkdir -p run var
	$(BIN)/virtnode serve --config packaging/dev.toml

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

check: venv
	$(BIN)/ruff check agent storage network tests bench tools tools/lab
	$(BIN)/mypy --strict -p virtnode
	$(BIN)/mypy --strict tools/lab
	$(BIN)/lint-imports

docs: venv
	$(BIN)/python -m virtnode.rpc.schema > api_schema/schema.json
	$(BIN)/python -m virtnode.rpc.apidoc > docs/api.md
	$(BIN)/python -m virtnode.rpc.typegen > api_schema/params.py

bench: setup
	$(BIN)/python bench/start.py
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/events.py
	$(BIN)/python bench/vm.py
	$(BIN)/python bench/stats.py
	$(BIN)/python bench/scrape.py
	$(BIN)/python bench/network.py
	$(BIN)/python bench/fuzz.py
	$(BIN)/python bench/console.py

setup: host venv compile web

# The console pages' browser packages (noVNC, xterm.js), pinned by web/package-lock.json.
WEB_STAMP := web/node_modules/.package-lock.json

web: $(WEB_STAMP)

$(WEB_STAMP): web/package.json web/package-lock.json
	cd web && npm ci --ignore-scripts --no-audit --no-fund
	@touch $@

# Byte-compile the project, as installing a package does. Where PYTHONDONTWRITEBYTECODE
# is set, every agent start would otherwise compile each module from source (0.15-0.2 s).
compile: venv
	@$(BIN)/python -m compileall -q $(LINK_TREE)

host:
	@tools/ensure-host

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	rm -rf build/__editable__.virtnode-*
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=strict
	@rm -f $(VENV)/.installed-*
	@touch $@

clean:
	rm -rf $(VENV) build dist run var *.egg-info web/node_modules
