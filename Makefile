# aiogateway developer workflow. Needs only Python 3.11 (and the package registries).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install dev demo test lint test-tools bench-tools bench bench-quick fuzz soak clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,docs]'
	touch $(STAMP)

install: $(STAMP)

# promtool (Debian's prometheus package) validates /metrics output, headless chromium
# loads /docs; best effort.
test-tools:
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq prometheus >/dev/null) \
	  || echo "promtool unavailable: its test will be skipped"; } || true
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium unavailable: the /docs browser test will be skipped"; } || true

# The tests start what they need themselves: upstream servers, gateways, an embedded
# PostgreSQL (unless TEST_DATABASE_URL is reachable) and a Kafka-protocol broker
# (unless KAFKA_BOOTSTRAP_SERVERS is set).
test: $(STAMP) test-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check aiogateway plugins tests bench fuzz soak examples
	$(BIN)/mypy

# The whole stack, no Docker: PostgreSQL ($$DATABASE_URL or embedded), a Kafka broker
# ($$KAFKA_BOOTSTRAP_SERVERS or Tansu), the sample services and the gateway on :8002.
# Ctrl-C stops everything it started.
dev: $(STAMP)
	$(BIN)/python -m aiogateway.demo.devstack --config config.toml

# The walkthrough (sign up, sign in, /v1/client/me, events, audit rows), printed step
# by step: against a running `make dev`, else on a stack of its own, stopped after.
demo: $(STAMP)
	$(BIN)/python -m aiogateway.demo.devstack --config config.toml --demo

# The bench's baselines and tools: FastAPI+uvicorn+httpx and py-spy (the bench extra),
# and, best effort, Debian's wrk, nginx and HAProxy (without them: built-in load client
# and upstream, proxy rows skipped, said so in the table) and valgrind (bench/instructions.py).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench-tools: $(BENCH_STAMP)
	@missing=""; for t in wrk nginx haproxy valgrind; do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq $$missing >/dev/null) \
	  || echo "not installed:$$missing (the bench runs without them)"; } || true; fi

bench: bench-tools
	$(BIN)/python bench/run.py

bench-quick: bench-tools
	$(BIN)/python bench/run.py --quick

# Fuzz normalize_path, Router.match and the header rewriting (fuzz/targets.py) for
# FUZZ_SECONDS (default 60), then the config.toml properties with 500 examples each (~1 min).
fuzz: $(STAMP)
	$(BIN)/python fuzz/run.py --seconds $${FUZZ_SECONDS:-60}

# SOAK_MINUTES (default 10) at SOAK_RPS (default 100) through the full plugin chain with
# PostgreSQL and a Kafka broker; RSS/fds/tasks slopes, non-2xx, audit rows = events = requests.
# SOAK_OUTAGE=1: PostgreSQL and Kafka cut for the middle fifth (latency within 2x, no loss).
soak: $(STAMP)
	$(BIN)/python soak/run.py

clean:
	rm -rf $(VENV) .run build *.egg-info .pytest_cache .mypy_cache .ruff_cache
