# gptload: `make run` serves it, `make test` checks it. Both set up .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TEST_DATABASE_DSN ?= mysql://root@127.0.0.1:3306/gptload
TEST_REDIS_DSN ?= redis://127.0.0.1:6379/13
PYTEST_ARGS ?=
# The test process's own admin key (the servers it starts get theirs from conftest.py), so
# that a test run never makes the data/auth_key that `make run` would show at first boot.
TEST_AUTH_KEY := sk-test-run-0123456789abcdefghij
TEST_SECRET_KEY := test-run-django-secret-0123456789abcdefghijklmnop
TEST_SECRETS := AUTH_KEY=$(TEST_AUTH_KEY) SECRET_KEY=$(TEST_SECRET_KEY)
# pytest-xdist processes for each pass (a test database each; on the MariaDB pass a Redis
# database each too, TEST_REDIS_DSN's number plus the worker's: tests/redis_per_worker.py).
# Two each on 2 cores: the served-process tests wait on their servers, and a second
# worker fills those waits (measured on a quiet machine: 8:50 with one each, 7:22 with two
# on the SQLite pass, 7:06 with two each; the CPU time, about 12½ minutes, is the floor).
SQLITE_WORKERS ?= 2
MYSQL_WORKERS ?= 2
BENCH_ARGS ?=

.PHONY: browser-deps run test test-sqlite test-mysql test-docker lint format lock bench bench-keys bench-levers migrate clean system-deps

run: $(VENV)/.installed
	$(PY) manage.py serve

# Lint and both stores at once (about 7 minutes on 2 cores); each target's output is
# printed whole when it ends (-O).
test: $(VENV)/.installed-dev browser-deps
	.ci/services
	$(MAKE) --no-print-directory -j3 -O lint test-sqlite test-mysql

test-sqlite: $(VENV)/.installed-dev
	@echo "== tests on SQLite, in-process state =="
	env -u DATABASE_DSN -u REDIS_DSN $(TEST_SECRETS) $(PY) -m pytest -n $(SQLITE_WORKERS) $(PYTEST_ARGS)

test-mysql: $(VENV)/.installed-dev
	@echo "== tests on MariaDB + Redis =="
	.ci/services
	DATABASE_DSN=$(TEST_DATABASE_DSN) REDIS_DSN=$(TEST_REDIS_DSN) $(TEST_SECRETS) $(PY) -m pytest -p tests.redis_per_worker -n $(MYSQL_WORKERS) $(PYTEST_ARGS)

# The Docker image and the Compose file, built and run here for real (tests/docker/run.py):
# one container, then the cluster profile on this machine's MariaDB and Redis. Not part of
# `make test`: it needs root (it installs and starts a Docker engine when there is none).
test-docker: $(VENV)/.installed-dev
	$(PY) -m tests.docker.run

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(TEST_SECRETS) $(VENV)/bin/mypy .
	$(VENV)/bin/lint-imports --no-cache

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

migrate: $(VENV)/.installed
	$(PY) manage.py migrate

# Direct vs proxied req/s, added latency and worker RSS (bench/README.md); BENCH_ARGS=--quick for a smoke run.
bench: $(VENV)/.installed-dev
	$(PY) bench/run.py $(BENCH_ARGS)

# Import, list and clear 100,000 keys against issue 4's targets (bench/README.md); BENCH_ARGS as above.
bench-keys: $(VENV)/.installed-dev
	$(PY) bench/keys.py $(BENCH_ARGS)

# Steady load with faults mixed in for 30 minutes: RSS, open files and tasks must stay flat
# (bench/soak.py, bench/README.md); BENCH_ARGS="--minutes 3" for a short run.
.PHONY: soak
soak: $(VENV)/.installed-dev
	$(PY) bench/soak.py $(BENCH_ARGS)

# Key picks with many keys cooling, one group's rebuild, full GC with a big snapshot: now vs before.
bench-levers: $(VENV)/.installed-dev
	$(PY) bench/levers.py $(BENCH_ARGS)

# Re-pin every dependency (transitive ones too) after editing requirements*.in.
lock: $(VENV)/.installed-dev
	$(VENV)/bin/pip-compile -q --strip-extras --no-header --allow-unsafe --no-emit-index-url \
	  --no-emit-find-links -o requirements.txt requirements.in
	$(VENV)/bin/pip-compile -q --strip-extras --no-header --allow-unsafe --no-emit-index-url \
	  --no-emit-find-links -o requirements-dev.txt requirements-dev.in

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; gptload needs Python 3.11 (set PYTHON=...)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

# --no-compile: modules are compiled as they are first imported, most never are (a fresh
# clone's `make test` is a quarter of a minute sooner).
$(VENV)/.installed: requirements.txt $(VENV)/bin/python | system-deps
	$(PY) -m pip install -q --no-compile -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(PY) -m pip install -q --no-compile -r requirements-dev.txt
	touch $@

# mysqlclient compiles against the MariaDB/MySQL client headers.
system-deps:
	@if ! pkg-config --exists mysqlclient 2>/dev/null && ! pkg-config --exists libmariadb 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing the MariaDB client headers for mysqlclient..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-libmysqlclient-dev pkg-config >/dev/null; \
	  else \
	    echo "error: mysqlclient needs the MySQL/MariaDB client headers:" >&2; \
	    echo "  sudo apt-get install default-libmysqlclient-dev pkg-config   (Debian/Ubuntu)" >&2; \
	    exit 1; \
	  fi; \
	fi

# The console's browser test (tests/test_browser.py) drives Debian's Chromium through Playwright.
browser-deps:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Chromium for the console's browser test..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "error: the console's browser test needs Chromium:" >&2; \
	    echo "  sudo apt-get install chromium   (Debian/Ubuntu)" >&2; \
	    exit 1; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache staticfiles
