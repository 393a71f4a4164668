# Two entry points for a new machine: `make demo` and `make test`.
# Both create .venv and install qcstream with its dependencies on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test unit browser services-up services-down clean

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
test: $(STAMP) browser
	$(BIN)/python -m pytest

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

# Debian's Chromium and its WebDriver, for the dashboard's browser test. Selenium
# must find both here, so that it never tries to download a browser or a driver.
CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver
BROWSER_PACKAGES := chromium chromium-driver

browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && apt-get install -y --no-install-recommends $(BROWSER_PACKAGES); \
	else \
		echo "missing $(CHROMIUM) or $(CHROMEDRIVER): run 'sudo apt-get update && sudo apt-get install -y --no-install-recommends $(BROWSER_PACKAGES)'" >&2; \
		exit 1; \
	fi

services-up: $(STAMP)
	$(BIN)/qcstream services up

services-down: $(STAMP)
	$(BIN)/qcstream services down

clean:
	rm -rf $(VENV) qcstream-data *.egg-info
