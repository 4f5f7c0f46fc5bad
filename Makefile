# fhirbridge — `make run` starts the service on embedded defaults; `make test` runs the suite
# against real components (Orthanc, DCMTK, dciodvfy, a FHIR server, MLLP clients).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test test-fast test-deps bench lint lock audit clean

# Installs the versions pinned in requirements.lock (what the suite was run with); pyproject's
# ranges keep floors above known advisories.
$(BIN)/fhirbridge: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

install: $(BIN)/fhirbridge

run: install
	$(BIN)/fhirbridge serve $(if $(CONFIG),--config $(CONFIG))

test-deps: install
	scripts/install-test-deps.sh

test: test-deps
	$(BIN)/pytest -q $(PYTEST_ARGS)

# Unit tests only: no Orthanc, FHIR server or DCMTK needed.
test-fast: install
	$(BIN)/pytest -q --ignore=tests/integration $(PYTEST_ARGS)

# Re-pin after changing dependencies: the current venv's versions become the lock file.
lock: install
	{ head -2 requirements.lock; $(BIN)/pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

# Known-vulnerability scan of the pinned versions (needs the PyPI JSON API or OSV to answer;
# --strict fails when a package could not be audited instead of passing it silently).
# Not part of `make test`: many sites (and our build machines) cannot reach the data. Its
# own venv, so pip-audit never lands in the lock file.
audit: requirements.lock
	test -x .venv-audit/bin/pip-audit || \
	  ($(PYTHON) -m venv .venv-audit && .venv-audit/bin/pip install --quiet pip-audit)
	.venv-audit/bin/pip-audit --strict -r requirements.lock

bench: test-deps
	$(BIN)/python bench/photo_pipeline.py

clean:
	rm -rf var .pytest_cache
