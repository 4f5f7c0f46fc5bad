# fhirbridge — `make run` starts the service on embedded defaults; `make test` runs the suite
# against real components (Orthanc, DCMTK, dciodvfy, a FHIR server, MLLP clients).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test test-deps bench lint clean

$(BIN)/fhirbridge: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/fhirbridge

run: install
	$(BIN)/fhirbridge serve $(if $(CONFIG),--config $(CONFIG))

test-deps: install
	scripts/install-test-deps.sh

test: test-deps
	$(BIN)/pytest -q $(PYTEST_ARGS)

bench: test-deps
	$(BIN)/python bench/photo_pipeline.py

clean:
	rm -rf var .pytest_cache
