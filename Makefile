# DualPath Mesh — the two front-door commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/laptop.yaml
OUT    ?= results/demo

.PHONY: demo test system-deps venv lint typecheck unit integration privileged bench bench-isolation clean

# Debian/Ubuntu packages the lab and its tests use; installed only when missing.
SYSTEM_BINS := ip:iproute2 iptables:iptables iperf3:iperf3
system-deps:
	@missing=""; for pair in $(SYSTEM_BINS); do bin=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$bin >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing packages:$$missing (run as root or install them)"; exit 1; fi; \
	  echo "installing:$$missing"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/dualpath: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/dualpath

demo: system-deps venv
	$(BIN)/dualpath compare -c $(CONFIG) --out $(OUT)

lint: venv
	$(BIN)/ruff check services scheduler netem lab tests bench
	$(BIN)/ruff format --check services scheduler netem lab tests bench

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests/unit

integration: venv
	$(BIN)/pytest -q tests/integration

privileged: system-deps venv
	$(BIN)/pytest -q tests/privileged

test: system-deps venv lint typecheck
	$(BIN)/pytest -q tests/unit tests/integration tests/privileged

bench: system-deps venv
	$(BIN)/python bench/goodput.py

# ~8 minutes: collective latency under a saturating KV relay, isolation on vs off.
bench-isolation: venv
	$(BIN)/python bench/isolation.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
