# The project's commands. `make demo` and `make test` are the README's two set-up commands;
# both create .venv and install moeprune into it on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moeprune-installed

.PHONY: demo test lint

$(STAMP): pyproject.toml
	# the testbed corpus is built from Debian's man pages (tests rebuild it); install them when we can
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$(grep -v '^#' testbed/requirements-apt.txt) >/dev/null \
		|| echo "warning: could not install testbed/requirements-apt.txt; the corpus rebuild test will skip"; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0  # the CPU build; a plain `torch` would pull CUDA wheels
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moeprune demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks testbed
	$(VENV)/bin/ruff format --check src tests benchmarks testbed
