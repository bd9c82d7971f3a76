# The entry point for everything: `make run` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST_PORTS ?= --tcp 127.0.0.1:5050 --udp 127.0.0.1:5051 --http 127.0.0.1:8080

.PHONY: run edge-demo test test-deps bench bench-quick bench-deps fuzz lint typecheck mutate clean help

help:
	@echo "make run   - create .venv, install, serve the demo and the broker on tcp 5050 / udp 5051"
	@echo "            and HTTP 8080 (the dashboard at http://127.0.0.1:8080/),"
	@echo "            printing its methods and commands to try (Ctrl-C stops)"
	@echo "make edge-demo - a cloud sink, an edge relay and simulated devices, with a status line"
	@echo "make test  - create .venv, install dev dependencies, run the whole test suite"
	@echo "make bench - install the peers (pyzmq, gRPC, NATS, Redis...) and run the benchmarks"
	@echo "make fuzz  - fuzz the protocol core with atheris (FUZZ_RUNS=200000, bounded)"
	@echo "make lint  - ruff and mypy"
	@echo "make mutate - mutation testing of the protocol core and dispatcher (mutmut; slow)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[http]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/sockstack serve --broker $(HOST_PORTS)

# Edge computing on one machine: a cloud sink, an edge relay with the example pipeline, and 50
# simulated devices over UDP for 30 s, with the relay's status line (docs/EDGE.md).
edge-demo: $(VENV)/.installed
	examples/edge_demo.sh $(BIN)

# Debian tools some tests use: tshark checks `sockstack inspect` against a real capture, chromium
# runs the HTTP dashboard's browser test (Playwright drives Debian's browser: a browser download
# of the test tool's own cannot work here), postgresql is the server tests/edge/pg.py starts for
# the PostgreSQL sink's tests (its programs are under /usr/lib/postgresql/N/bin, not on PATH;
# RUNLEVEL=1 keeps the package's own cluster from starting), nats-server runs the 3-node
# cluster the scale tests start across network-namespace hosts (tests/helpers/netns.py; in
# /usr/sbin, not on a user's PATH). The tests that need them are
# skipped, saying why, where they cannot be installed (no root or apt).
TEST_DEBS := tshark chromium nats-server
test-deps:
	@missing=""; for b in $(TEST_DEBS); do command -v $$b >/dev/null || [ -x /usr/sbin/$$b ] || missing="$$missing $$b"; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1; } || \
	    echo "not installed:$$missing (apt failed): the tests that need them will be skipped"; \
	  else echo "not installed:$$missing (needs root and apt): the tests that need them will be skipped"; fi; \
	fi

test: $(VENV)/.installed-dev test-deps
	PYTHONASYNCIODEBUG=1 $(BIN)/python -m pytest

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(VENV)/.installed $(VENV)/.installed-dev $@

# Debian packages for the peer servers; skipped (and reported by the bench) where apt is absent
# or we are not root. RUNLEVEL=1 keeps the packages' own services from starting.
bench-deps: $(VENV)/.installed-bench
	@missing=""; for b in redis-server nats-server mosquitto gcc wrk; do command -v $$b >/dev/null || [ -x /usr/sbin/$$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && RUNLEVEL=1 apt-get install -y -qq --no-install-recommends redis-server nats-server mosquitto gcc wrk >/dev/null; \
	  else echo "not installing$$missing (needs root and apt): the bench will skip them"; fi; \
	fi

FUZZ_RUNS ?= 200000
fuzz: $(VENV)/.installed-dev
	mkdir -p .fuzz-corpus
	$(BIN)/python fuzz/fuzz_session.py -runs=$(FUZZ_RUNS) -max_len=1024 .fuzz-corpus

bench: bench-deps
	$(BIN)/python -m bench --readme README.md

bench-quick: bench-deps
	$(BIN)/python -m bench --quick

$(VENV)/.installed-mutate: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,mutate]'
	touch $(VENV)/.installed $(VENV)/.installed-dev $@

# Mutation testing ([tool.mutmut] in pyproject.toml): the protocol core (frames, connection,
# datagram, messages, auth, calls, registry) and host/dispatch.py, against tests/protocol and
# tests/rpc only.
# Too slow for `make test` (every mutant reruns its tests); it resumes where it stopped. Narrow it
# with MUTANTS, a mutant name pattern: make mutate MUTANTS='sockstack.protocol.auth*'.
# Then `.venv/bin/mutmut results` lists the survivors, `.venv/bin/mutmut show NAME` one diff.
MUTANTS ?=
MUTATE_JOBS ?= 2
mutate: $(VENV)/.installed-mutate
	$(BIN)/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests examples bench fuzz
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants
