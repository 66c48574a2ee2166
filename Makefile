# Lantern: `make demo` and `make test` work on a fresh clone.
# `make demo` trains and registers the demo model, then serves endpoint.yaml on http://127.0.0.1:$(PORT) (Ctrl+C stops it);
# `make demo ENDPOINT=endpoint-detection.yaml` does the same with the demo detector.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip installs without byte-compiling (--no-compile, below): modules compile on first import and the cache is kept.
# With PYTHONDONTWRITEBYTECODE set it would not be, and every process would compile torch again (minutes a test run).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile -e '.[test]'  # most modules are never imported
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

PORT ?= 3000
ENDPOINT ?= endpoint.yaml
DEMO_TASK := $(if $(filter endpoint-detection.yaml,$(notdir $(ENDPOINT))),object_detection,classification)

demo: $(STAMP)
	$(BIN)/lantern demo --port $(PORT) --task $(DEMO_TASK)
	$(BIN)/lantern serve $(ENDPOINT) --port $(PORT)

clean:
	rm -rf .lantern demo-data
