# Two commands do everything on a fresh machine (Debian, Python 3.11, Java 17):
#   make demo   set up .venv if needed, then run the whole DAG on generated data
#   make test   set up .venv if needed, then run the test suite
SHELL := bash
.SHELLFLAGS := -eo pipefail -c  # a failing pip inside a pipe fails the target
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cerebro-installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup setup-postgres demo test test-fast bench clean-demo

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@scripts/check-java
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	@start=$$(date +%s); \
	  $(PY) -m pip install --quiet --upgrade "pip>=24" 2>&1 | { grep -v "^WARNING: Location" || true; }; \
	  $(PY) -m pip install --quiet -r requirements.txt -c constraints.txt 2>&1 | { grep -v "^WARNING: Location" || true; }; \
	  $(PY) -m pip install --quiet --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }; \
	  $(PY) -m pip check; \
	  echo "installed the pinned stack into $(VENV) in $$(( $$(date +%s) - start )) s"
	@touch $@

# Airflow's metadata database on Postgres (README, "A real metadata database"): the pinned driver
setup-postgres: setup
	$(PY) -m pip install --quiet --no-deps -c constraints.txt psycopg2-binary asyncpg
	$(PY) -m pip check

demo: setup
	@scripts/demo

# Two test files at a time: the slow tests spend much of their time waiting (JVM and Python start-up,
# Airflow's scheduler loop), so on 2 cores the suite takes 15-17 min instead of 21. TEST_WORKERS=0 runs
# it in this one process (pytest-xdist's -n 0).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-demo:
	rm -rf .demo
