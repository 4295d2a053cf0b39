# stapfarm: `make up` sets the host up and starts the lab farm; `make test` runs every test.
PY := .venv/bin/python
# Debian testing on mirror snapshots is served with a Release past its Valid-Until; the images
# are built from testing (systemtap 5.6), so the Makefile opts in explicitly. Set
# IMAGE_BUILD_FLAGS= to refuse expired Release files.
IMAGE_BUILD_FLAGS ?= --allow-expired-release
export IMAGE_BUILD_FLAGS
PYTEST_FLAGS ?=

.PHONY: setup up test test-fast lint clean-test

setup:
	bash scripts/setup.sh

up: setup
	@echo "stapfarm: set-up complete. The lab farm (compose.yaml) is not part of this release yet;"
	@echo "stapfarm: start servers with: .venv/bin/stap-server start -a x86_64 -r <release>"

test: setup
	$(PY) -m pytest $(PYTEST_FLAGS)

test-fast:
	$(PY) -m pytest -m "not docker and not slow" $(PYTEST_FLAGS)

lint:
	$(PY) -m ruff check farm tests
	$(PY) -m mypy farm
