# Two entry points for a new machine: `make demo` and `make test`.
# Both create .venv and install qcstream with its dependencies on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test unit services-up services-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

# The main job: local Kafka + MinIO, fit, evaluate, stream the tire test frames, report.
demo: $(STAMP)
	$(BIN)/qcstream demo

# All tests; the integration tests start the local Kafka and MinIO themselves.
test: $(STAMP)
	$(BIN)/python -m pytest

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

services-up: $(STAMP)
	$(BIN)/qcstream services up

services-down: $(STAMP)
	$(BIN)/qcstream services down

clean:
	rm -rf $(VENV) qcstream-data *.egg-info
