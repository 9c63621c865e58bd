# One task runner for people and CI. `make run` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= harvest-out

.PHONY: install run report test lint typecheck check clean lock

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the pinned runtime and dev tools

run: $(STAMP)  ## start the sandbox, harvest sample_inputs/ into $(OUT), show the manifest
	@$(BIN)/python -m harvester.demo --out $(OUT) sample_inputs/*.csv

report: $(STAMP)  ## after `make run`: the report's tables, and $(OUT)/report.html to open in a browser
	@$(BIN)/harvester report $(OUT)
	@$(BIN)/harvester report $(OUT) --html $(OUT)/report.html

test: $(STAMP)  ## lint, type-check and the whole test suite
	$(BIN)/ruff check harvester tests
	$(BIN)/ruff format --check harvester tests
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check harvester tests
	$(BIN)/ruff format --check harvester tests

typecheck: $(STAMP)
	$(BIN)/mypy

lock: $(STAMP)  ## re-pin requirements.lock from the current .venv
	{ echo "# Every package the project installs, pinned: runtime and development tools."; \
	  echo "# Used as pip constraints by the Makefile; refresh with 'make lock'."; \
	  $(BIN)/python -m pip freeze --exclude-editable; } > requirements.lock

clean:
	rm -rf $(VENV) $(OUT) .mypy_cache .ruff_cache .pytest_cache .hypothesis
