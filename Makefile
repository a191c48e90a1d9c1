# The two commands: `make demo` and `make test`. Every target creates .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SYSTEM_STAMP := $(VENV)/.system-stamp
PYTEST_ARGS ?=

.PHONY: help venv system-deps demo test lint format unit integration e2e bench stack-up stack-down clean

help:
	@echo "make demo    run the main job on the local stack (creates .venv when missing)"
	@echo "make test    lint, then the unit, integration and end-to-end tests"
	@echo "make bench   run the benchmarks under bench/"
	@echo "make stack-up / stack-down   start or stop the local stack"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25"
	$(BIN)/python -m pip install --progress-bar off -r requirements.txt -e '.[dev]'
	touch $@

venv: $(STAMP)

# Prometheus (Debian's package) for the test that scrapes the model server and the local
# stack's Prometheus. Installed when running as root with apt-get (CI); elsewhere that one test
# is skipped with a reason. The package's own service is stopped and disabled where it started:
# the stack runs its own on 127.0.0.1 (TIRE_PROMETHEUS_PORT) with a configuration of its own.
$(SYSTEM_STAMP): | $(STAMP)
	@if ! command -v prometheus >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	    if [ -d /run/systemd/system ]; then \
	      systemctl disable --now prometheus >/dev/null 2>&1 || true; \
	    elif [ -e /run/prometheus/prometheus.pid ]; then /etc/init.d/prometheus stop || true; fi; \
	  else \
	    echo "prometheus is not installed: its test will be skipped (apt-get install prometheus)"; \
	  fi; \
	fi
	@# docker-compose (v1, Debian's) renders docker/compose.yaml in the deployment tests; psql runs
	@# the PostgreSQL init script of the compose stack in its test.
	@for tool in docker-compose:docker-compose psql:postgresql-client; do \
	  if ! command -v "$${tool%%:*}" >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	        apt-get install -y -qq --no-install-recommends "$${tool#*:}" >/dev/null; \
	    else \
	      echo "$${tool%%:*} is not installed: apt-get install $${tool#*:}"; \
	    fi; \
	  fi; \
	done
	@# PgPool-II (Debian's pgpool2) for the test that runs MLflow and the registry lock through
	@# it. The package's own service is stopped and disabled where it started: the stack runs its
	@# own pgpool on 127.0.0.1 (TIRE_PGPOOL_PORT) with a configuration of its own.
	@if ! command -v pgpool >/dev/null 2>&1 && [ ! -x /usr/sbin/pgpool ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends pgpool2 >/dev/null; \
	    if [ -d /run/systemd/system ]; then systemctl disable --now pgpool2 >/dev/null 2>&1 || true; \
	    elif [ -e /var/run/postgresql/pgpool.pid ]; then /etc/init.d/pgpool2 stop || true; fi; \
	  else \
	    echo "pgpool is not installed: its test will be skipped (apt-get install pgpool2)"; \
	  fi; \
	fi
	@# Alertmanager and amtool (Debian's prometheus-alertmanager) for the tests of
	@# docker/alertmanager/. The tests run their own Alertmanager on a free port: the package's
	@# service is stopped and disabled where it started (by its pid file, through its init script).
	@if ! command -v amtool >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus-alertmanager >/dev/null; \
	    if [ -d /run/systemd/system ]; then \
	      systemctl disable --now prometheus-alertmanager >/dev/null 2>&1 || true; \
	    elif [ -e /run/prometheus/prometheus-alertmanager.pid ]; then \
	      /etc/init.d/prometheus-alertmanager stop || true; fi; \
	  else \
	    echo "amtool is not installed: its tests fail (apt-get install prometheus-alertmanager)"; \
	  fi; \
	fi
	@# The Pushgateway (Debian's prometheus-pushgateway) that the pipeline pushes its batch-job
	@# metrics to, for its tests and the local stack, which runs its own on 127.0.0.1
	@# (TIRE_PUSHGATEWAY_PORT): the package's service is stopped and disabled where it started.
	@if ! command -v prometheus-pushgateway >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus-pushgateway >/dev/null; \
	    if [ -d /run/systemd/system ]; then \
	      systemctl disable --now prometheus-pushgateway >/dev/null 2>&1 || true; \
	    elif [ -e /run/prometheus/prometheus-pushgateway.pid ]; then \
	      /etc/init.d/prometheus-pushgateway stop || true; fi; \
	  else \
	    echo "prometheus-pushgateway is not installed: its tests are skipped" \
	      "(apt-get install prometheus-pushgateway)"; \
	  fi; \
	fi
	touch $@

system-deps: $(SYSTEM_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint system-deps
	$(BIN)/pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

integration: $(STAMP) system-deps
	$(BIN)/pytest -m integration $(PYTEST_ARGS)

e2e: $(STAMP)
	$(BIN)/pytest -m e2e $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/dataloading.py
	$(BIN)/python bench/training.py
	$(BIN)/python bench/recipe.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/serving_cifar.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/serving_backends.py

stack-up: $(STAMP)
	$(BIN)/tirelib stack up

stack-down: $(STAMP)
	$(BIN)/tirelib stack down

demo: $(STAMP)
	$(BIN)/tirelib demo

clean:
	-$(BIN)/tirelib stack down
	rm -rf .tire
