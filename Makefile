# One entry point per task. `make demo` and `make test` are the README's two set-up commands.
VENV ?= .venv
BIN := $(VENV)/bin
MEMCITY_HOME ?= $(CURDIR)/.memcity

.PHONY: install demo ingest test test-fast lint format bench ui screenshots clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml package-lock.json scripts/install.sh
	bash scripts/install.sh

demo: install            ## install, copy the sample corpus to the landing folder, run every stage
	$(BIN)/memcity demo

ingest: install          ## run every stage on the landing folder
	$(BIN)/memcity ingest

test: install            ## the whole test suite (needs Postgres on 127.0.0.1:5432)
	$(BIN)/python -m pytest

test-fast: install       ## the tests that need no Postgres, bubblewrap, Chromium or real model
	$(BIN)/python -m pytest -m "not postgres and not bwrap and not chromium and not local_model and not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install           ## print the benchmarks' figures
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

ui: install              ## the Dagster UI on http://127.0.0.1:3000 (embedded instance)
	mkdir -p $(MEMCITY_HOME)/dagster_home
	MEMCITY_HOME=$(MEMCITY_HOME) DAGSTER_HOME=$${DAGSTER_HOME:-$(MEMCITY_HOME)/dagster_home} \
	  $(BIN)/dagster dev -w workspace.yaml

screenshots: install     ## refresh the README's screenshots (drives the UI in Chromium)
	$(BIN)/python -m tests.ui.driver --screenshots docs/images

clean:
	rm -rf $(MEMCITY_HOME)
