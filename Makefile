# FLEAD: `make run` brings the whole system up on the embedded defaults; `make test` runs the suite.
# Every install step is a file target, so a second `make run` skips what is already there.

STATE      ?= .flead
VENV       := .venv
PY         := $(VENV)/bin/python
FLEAD      := $(VENV)/bin/flead
JARS       := $(STATE)/jars
MVN        := mvn -q -B -f jvm/pom.xml

.PHONY: run up replay stop status test lint bench clean-state

run: install up replay status

install: system-packages $(VENV)/.installed $(JARS)/.kafka

system-packages:
	@scripts/install-system-packages.sh

$(VENV)/.installed: pyproject.toml
	python3.11 -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[orchestration,dev]'
	touch $@

$(JARS)/.%: jvm/pom.xml
	rm -rf $(JARS)/$*
	$(MVN) -P $* dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(abspath $(JARS))/$*
	touch $@

up: install
	$(FLEAD) up

replay: up
	$(FLEAD) replay --unless-present

stop:
	@test -x $(FLEAD) && $(FLEAD) down || echo "nothing to stop: flead is not installed"

status:
	@$(FLEAD) status

test: install
	$(PY) -m pytest -q -ra

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install up
	$(PY) -m benchmarks.run
