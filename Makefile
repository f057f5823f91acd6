# DualPath Mesh — the two front-door commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/laptop.yaml
OUT    ?= results/demo

.PHONY: demo test system-deps venv lint typecheck unit integration privileged bench bench-isolation \
	clean tests fuzz fuzz-long docker images monitoring-image e2e fresh-test aiperf clients

# `$(T) CMD` times a step of CI (.ci/run sets DUALPATH_PHASES); nothing otherwise.
T = $(if $(DUALPATH_PHASES),.ci/phase $(or $(PHASE_NAME),$@))

# Debian/Ubuntu packages the lab and its tests use (command:package); installed only when
# missing. `make fresh-test` proves the list complete on a bare Debian root. python3-venv
# (ensurepip, for `python3 -m venv`) is a module, not a command. chromium: headless, for the test
# that opens an HTML report offline (tests/integration/test_report_browser.py); chromedriver
# (Debian's, the same version as its chromium) drives it for the live dashboard's test
# (tests/privileged/test_dashboard_browser.py, through selenium).
SYSTEM_BINS := ip:iproute2 tc:iproute2 iptables:iptables iperf3:iperf3 nft:nftables sysctl:procps \
	chromium:chromium chromedriver:chromium-driver
system-deps:
	@missing=""; for pair in $(SYSTEM_BINS); do bin=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$bin >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	$(PYTHON) -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then missing=$$(printf ' %s' $$(printf '%s\n' $$missing | sort -u)); \
	  if [ "$$(id -u)" != 0 ]; then echo "missing packages:$$missing (run as root or install them)"; exit 1; fi; \
	  echo "installing:$$missing"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(BIN)/dualpath: PHASE_NAME = venv
$(BIN)/dualpath: pyproject.toml examples/policy-plugin/pyproject.toml
	$(T) $(PYTHON) -m venv $(VENV)
	$(T) $(BIN)/pip install -q --upgrade pip
	$(T) $(BIN)/pip install -q -e '.[dev]'
	# the example policy plugin (docs/design.md, "Policy plugins"): its tests need it installed
	$(T) $(BIN)/pip install -q --no-deps -e examples/policy-plugin
	@touch $@

venv: $(BIN)/dualpath

demo: system-deps venv
	$(BIN)/dualpath compare -c $(CONFIG) --out $(OUT)

lint: venv
	$(T) $(BIN)/ruff check dualpath services scheduler netem lab compose tests bench \
	  examples/policy-plugin examples/pytest
	$(T) $(BIN)/ruff format --check dualpath services scheduler netem lab compose tests bench \
	  examples/policy-plugin examples/pytest
	$(T) $(BIN)/lint-imports --no-cache

typecheck: venv
	$(T) $(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests/unit

integration: venv
	$(BIN)/pytest -q tests/integration

privileged: system-deps venv
	$(BIN)/pytest -q tests/privileged

test: system-deps venv lint typecheck tests fuzz clients e2e

# examples/pytest: a user's test written only with the pytest plugin's fixtures (docs/testing.md).
tests: system-deps venv
	$(T) $(BIN)/pytest -q -m "not clients" tests/unit tests/integration tests/privileged examples/pytest

# Benchmark clients driving the lab unmodified (tests marked `clients`): NVIDIA's AIPerf, in a
# venv of its own (it pins many packages), replays a Mooncake trace against the OpenAI API.
AIPERF_VENV    ?= .venv-aiperf
AIPERF_VERSION ?= 0.13.0
$(AIPERF_VENV)/bin/aiperf: PHASE_NAME = aiperf
$(AIPERF_VENV)/bin/aiperf:
	$(T) $(PYTHON) -m venv $(AIPERF_VENV)
	$(T) $(AIPERF_VENV)/bin/pip install -q --disable-pip-version-check aiperf==$(AIPERF_VERSION)
	@touch $@

aiperf: $(AIPERF_VENV)/bin/aiperf

clients: venv aiperf
	$(T) env DUALPATH_AIPERF=$(AIPERF_VENV)/bin/aiperf $(BIN)/pytest -q -m clients tests/integration

# The fuzz tier on live servers (tests/fuzz): the CI budget, derandomized, so every run tries
# the same inputs; inputs tried per target go to the terminal and to results/fuzz/.
fuzz: venv
	$(T) env DUALPATH_FUZZ_REPORT=results/fuzz/ci.json $(BIN)/pytest -q tests/fuzz

# By hand: 10x the inputs per target, random (a new sample every run); ~8 minutes on 2 cores.
fuzz-long: venv
	$(T) env DUALPATH_FUZZ_PROFILE=long DUALPATH_FUZZ_REPORT=results/fuzz/long.json \
	  $(BIN)/pytest -q tests/fuzz

# --- Docker: the compose backend and tests/e2e (docs/compose.md) ----------------------------
# A Docker engine and compose: Debian's packages when missing, dockerd started when none answers
# (asked through the engine's API, with the venv's Docker SDK).
docker: venv
	$(T) env DUALPATH_PYTHON=$(BIN)/python compose/ensure-docker.sh

# The offline base image (debootstrap) and the project image from a local wheelhouse, no
# registry and no network during the build; both cached (/var/cache/dualpath, image labels).
images: docker venv
	$(T) env PYTHON=$(BIN)/python DUALPATH_PYTHON=$(BIN)/python compose/build-image.sh --offline

# The Prometheus image of the compose profile `monitoring`: Debian's prometheus package in a
# debootstrap base, built with no network (compose/build-monitoring-image.sh).
monitoring-image: docker venv
	$(T) env DUALPATH_PYTHON=$(BIN)/python compose/build-monitoring-image.sh --offline

# The compose stack end to end on a real engine; DUALPATH_E2E_REQUIRED turns a missing engine
# into a failure instead of a skip.
e2e: images monitoring-image
	$(T) env DUALPATH_E2E_REQUIRED=1 DUALPATH_OFFLINE=1 $(BIN)/pytest -q tests/e2e

# The fresh-machine tier (.ci/fresh-test, root): this checkout's HEAD cloned into a pristine
# Debian root (compose/build-base.sh --bare) in a privileged container, set up by the repo's
# own `make system-deps venv`, then `make tests`; an install step missing here fails it. The
# container is run, exec'd into and removed through the engine's API (compose/fresh.py, with
# the venv's python).
fresh-test: docker
	$(T) env DUALPATH_PYTHON=$(BIN)/python .ci/fresh-test

# The checked-in compose file of the laptop demo.
compose/docker-compose.yml: examples/laptop.yaml compose/render.py | venv
	$(BIN)/dualpath compose render -c examples/laptop.yaml -o $@

bench: system-deps venv
	$(BIN)/python bench/goodput.py

# ~8 minutes: collective latency under a saturating KV relay, isolation on vs off.
bench-isolation: venv
	$(BIN)/python bench/isolation.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
