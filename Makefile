# stapfarm: `make up` sets the host up and starts the lab farm; `make test` runs every test.
PY := .venv/bin/python
# Debian testing on mirror snapshots is served with a Release past its Valid-Until; the images
# are built from testing (systemtap 5.6), so the Makefile opts in explicitly. Set
# IMAGE_BUILD_FLAGS= to refuse expired Release files.
IMAGE_BUILD_FLAGS ?= --allow-expired-release
export IMAGE_BUILD_FLAGS
PYTEST_FLAGS ?=

.PHONY: setup up down test test-extended test-fast test-unit test-integration test-e2e \
	test-engine-restart lint \
	clean-test bench

setup:
	bash scripts/setup.sh

# `make up`: the lab farm of compose.yaml. Releases: STAPFARM_RELEASE_X86_64 / _ARM64 when set,
# else the newest release the farm has a tree for (x86_64 image), else the mirror's newest
# (added). KERNEL_FLAGS=--debuginfo adds vmlinux for DWARF probes. TRUST_DIR receives
# `stap-server trust --export` for clients.
COMPOSE_PROJECT ?= $(or $(STAPFARM_PREFIX),stapfarm)
KERNEL_FLAGS ?=
TRUST_DIR ?= /var/lib/stapfarm/trust
SS := .venv/bin/stap-server
# newest tree of target $$1 in the x86_64 image's volume (by the headers package's version)
NEWEST_TREE = $(PY) -c 'import json, sys; from debian.debian_support import Version; \
  v = lambda t: Version(t["packages"].get("linux-headers-" + t["release"], "0")); \
  ts = [t for t in json.load(sys.stdin) if t["arch"] == sys.argv[1] and t["image_arch"] == "x86_64"]; \
  print(max(ts, key=v)["release"] if ts else "")'

up: setup
	@set -e; prefix=$${STAPFARM_PREFIX:-stapfarm}; \
	rel() { \
	  r=$$($(SS) kernels list --json | $(NEWEST_TREE) $$1); \
	  [ -n "$$r" ] || r=$$($(SS) kernels available -a $$1 | sed -n 1p | cut -f 2); \
	  [ -n "$$r" ] || { echo "stapfarm: no $$1 kernel release on the mirror" >&2; exit 1; }; \
	  echo "$$r"; }; \
	x86=$${STAPFARM_RELEASE_X86_64:-$$(rel x86_64)}; arm=$${STAPFARM_RELEASE_ARM64:-$$(rel arm64)}; \
	echo "stapfarm: releases x86_64 $$x86, aarch64 $$arm"; \
	$(SS) kernels add -a x86_64 -r "$$x86" $(KERNEL_FLAGS); \
	$(SS) kernels add -a aarch64 -r "$$arm" $(KERNEL_FLAGS); \
	export STAPFARM_PREFIX=$$prefix STAPFARM_RELEASE_X86_64=$$x86 STAPFARM_RELEASE_ARM64=$$arm; \
	export STAPFARM_HOSTNAME=$${STAPFARM_HOSTNAME:-$$(hostname)}; \
	export STAPFARM_KERNELS_VOLUME=$${STAPFARM_KERNELS_VOLUME:-$$prefix-kernels-amd64}; \
	export STAPFARM_HOME_VOLUME=$${STAPFARM_HOME_VOLUME:-$$prefix-home}; \
	export STAPFARM_LOG_VOLUME=$${STAPFARM_LOG_VOLUME:-$$prefix-log}; \
	docker compose -p $(COMPOSE_PROJECT) up -d; \
	xp=$${STAPFARM_X86_64_PORT:-5101}; ap=$${STAPFARM_AARCH64_PORT:-5102}; ep=$${STAPFARM_ENDPOINT_PORT:-5100}; \
	for p in $$xp $$ap $$ep; do end=$$(( $$(date +%s) + 120 )); \
	  until $(PY) -c 'import sys; from farm.trust import tls; tls.probe("127.0.0.1", int(sys.argv[1]), timeout=3.0)' $$p 2>/dev/null; do \
	    [ $$(date +%s) -lt $$end ] || { echo "stapfarm: port $$p does not answer TLS; see: docker compose -p $(COMPOSE_PROJECT) logs" >&2; exit 1; }; \
	    sleep 1; done; done; \
	$(SS) status; \
	$(SS) trust --export $(TRUST_DIR) >/dev/null; \
	h=$$STAPFARM_HOSTNAME; \
	echo; echo "stapfarm: the lab farm is up (docker compose -p $(COMPOSE_PROJECT); make down stops it)."; \
	echo "stapfarm: on a client (Debian: apt-get install systemtap systemtap-client libnss3-tools), as the user who runs stap:"; \
	echo; \
	echo "  scp -r root@$$h:$(TRUST_DIR) /tmp/stapfarm-trust && sh /tmp/stapfarm-trust/trust-farm.sh   # once"; \
	echo "  stap --use-server=$$h:$$ep -a arm64 -r $$arm -p4 -m hello -e 'probe begin { println(\"hello\"); exit() }'"; \
	echo "  stap --use-server=$$h:$$ep -a x86_64 -r $$x86 -p4 -m hello -e 'probe begin { println(\"hello\"); exit() }'"; \
	echo; \
	echo "stapfarm: port $$ep is the farm endpoint (every target, module cache, provisioning); it is the one to expose."; \
	echo "stapfarm: the servers behind it ($$xp x86_64, $$ap aarch64) have their own certificates; trust them only on a trusted network: $(SS) trust -n x86_64 -n aarch64 --export DIR"; \
	echo; \
	echo "stapfarm: for docker compose commands in this shell: export STAPFARM_RELEASE_X86_64=$$x86 STAPFARM_RELEASE_ARM64=$$arm STAPFARM_HOSTNAME=$$h"

# `make down`: stop and remove the lab farm's containers and the servers its endpoint
# provisioned (volumes are kept: certificates, cache, log; `docker compose -p stapfarm down -v`
# removes them too).
down:
	STAPFARM_RELEASE_X86_64=$${STAPFARM_RELEASE_X86_64:-none} STAPFARM_RELEASE_ARM64=$${STAPFARM_RELEASE_ARM64:-none} \
	  docker compose -p $(COMPOSE_PROJECT) down
	@# servers the endpoint provisioned belong to no compose project: stop them too
	STAPFARM_PREFIX=$${STAPFARM_PREFIX:-stapfarm} $(SS) endpoint stop

# `make test` (CI): every tier but the `extended` tests (README "Tests and CI").
test: setup
	$(PY) -m pytest -m "not extended" --durations=40 $(PYTEST_FLAGS)

# `make test-extended`: the slow lower-tier duplicates make test leaves out (~10 min).
test-extended: setup
	$(PY) -m pytest -m extended --durations=0 $(PYTEST_FLAGS)

test-fast:
	$(PY) -m pytest -m "not docker and not slow" $(PYTEST_FLAGS)

# One tier at a time (make test runs them all, the engine restart last).
test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_FLAGS)
test-integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_FLAGS)
test-e2e: setup
	$(PY) -m pytest tests/e2e -m "not engine_restart" $(PYTEST_FLAGS)
test-engine-restart: setup
	$(PY) -m pytest tests/e2e -m engine_restart $(PYTEST_FLAGS)

# ruff, mypy strict over every package, and the house rules (import cycles, layers,
# function-local imports, module sizes, the Docker SDK in farm/engine only, README layout).
lint:
	$(PY) -m ruff check farm tests bench
	$(PY) -m mypy farm
	$(PY) -m pytest -q tests/unit/test_architecture.py

# `make bench`: the benchmark harness (issue 8), not a test; BENCH_FLAGS=--quick for the
# developer's loop. Results go to bench/results/<date>.{json,md,png}; see bench/README.md.
BENCH_FLAGS ?=
bench: setup
	.venv/bin/pip install -q matplotlib || echo "bench: matplotlib unavailable: no chart"
	$(PY) -m bench $(BENCH_FLAGS)
