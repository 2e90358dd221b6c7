# The README's two quick-start commands: `make serve` and `make test`.
# Each creates .venv and installs what it needs on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the tests use as real peers.
DEBIAN_PACKAGES := dcmtk dicom3tools orthanc postgresql

.PHONY: serve test lint typecheck check system-packages clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/pacs-node serve

# Installs the peers when running as root with apt (CI, fresh containers);
# elsewhere the tests that need a missing peer skip (but fail under CI=true).
system-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=""; for tool in storescu dciodvfy Orthanc pg_ctlcluster; do \
			command -v $$tool >/dev/null || missing=yes; done; \
		if [ -n "$$missing" ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null; \
		fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) system-packages lint typecheck
	$(BIN)/pytest -m "not slow"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
