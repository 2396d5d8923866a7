# FLEAD: `make run` brings the whole system up on the embedded defaults; `make test` runs the suite.
# Every install step is a file target, so a second `make run` skips what is already there.

STATE      ?= .flead
VENV       := .venv
PY         := $(VENV)/bin/python
FLEAD      := $(VENV)/bin/flead
JARS       := $(STATE)/jars
MVN        := mvn -q -B -f jvm/pom.xml

.PHONY: run install system-packages up replay wait stop status test test-cluster lint bench backfill

run: install up replay wait status

FLINK_VENV := .venv-flink

install: system-packages $(VENV)/.installed $(FLINK_VENV)/.installed $(JARS)/.kafka $(JARS)/.flink $(JARS)/.spark

system-packages:
	@scripts/install-system-packages.sh

$(VENV)/.installed: pyproject.toml
	python3.11 -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[orchestration,dev]'
	touch $@

# PyFlink cannot share .venv (DESIGN §6); the job imports the project from the repo too.
$(FLINK_VENV)/.installed: requirements/flink.txt pyproject.toml
	python3.11 -m venv $(FLINK_VENV) 2>/dev/null || python3 -m venv $(FLINK_VENV)
	$(FLINK_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLINK_VENV)/bin/python -m pip install -q -r requirements/flink.txt
	$(FLINK_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

# The Flink connector is a shaded jar: copied without its (already bundled) dependencies.
$(JARS)/.flink: jvm/pom.xml
	rm -rf $(JARS)/flink
	$(MVN) -P flink dependency:copy-dependencies -DexcludeTransitive=true -DoutputDirectory=$(abspath $(JARS))/flink
	touch $@

$(JARS)/.%: jvm/pom.xml
	rm -rf $(JARS)/$*
	$(MVN) -P $* dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(abspath $(JARS))/$*
	touch $@

up: install
	$(FLEAD) up

replay: up
	$(FLEAD) replay --resume

# The main job's end: every reading scored, every global version evaluated (with progress).
wait:
	$(FLEAD) wait

stop:
	@test -x $(FLEAD) && $(FLEAD) down || echo "nothing to stop: flead is not installed"

status:
	@$(FLEAD) status

test: install
	$(PY) -m pytest -q -ra -m "not cluster"

# Cluster mode under failure (tests/test_cluster.py): three brokers and a Flink session cluster
# on ports of their own, a TaskManager and a broker killed during replays.
test-cluster: install
	$(PY) -m pytest -q -ra -m cluster tests/test_cluster.py

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

backfill: up
	$(FLEAD) backfill --wait

# Benchmarks need the storage services only; each starts the streaming processes it measures.
bench: install
	$(FLEAD) up --no-streaming --no-dagster
	$(PY) -m benchmarks.run
