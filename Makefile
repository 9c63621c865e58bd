# One task runner for people and CI. `make run` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The stamp names the interpreter's version: after a switch of Python (PYTHON=python3.12, or
# the system's python3 upgraded) the stamp is missing and the venv is rebuilt.
PYVER  := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
STAMP  := $(VENV)/.installed-stamp-py$(PYVER)
OUT    ?= harvest-out
VERSION_OF = $(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null

.PHONY: install run report test lint typecheck check clean lock bench packages-test packages-bench

$(STAMP): pyproject.toml requirements.lock
	@test -n "$(PYVER)" || { echo "make: $(PYTHON) not found; install Python 3.11 or newer, or run make PYTHON=/path/to/python3"; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "make: harvester needs Python 3.11 or newer; $(PYTHON) is $(PYVER). Run make PYTHON=python3.11 (or newer)"; exit 2; }
	@if [ -e $(VENV) ] && [ "$$($(call VERSION_OF,$(BIN)/python))" != "$(PYVER)" ]; then \
	  echo "make: $(VENV) was made with another Python ($$($(call VERSION_OF,$(BIN)/python) || echo 'gone')); rebuilding it with $(PYTHON) $(PYVER)"; \
	  rm -rf $(VENV); \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	rm -f $(VENV)/.installed-stamp*
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the pinned runtime and dev tools

run: $(STAMP)  ## start the sandbox, harvest sample_inputs/ into $(OUT), show the manifest
	@$(BIN)/python -m harvester.demo --out $(OUT) sample_inputs/*.csv

report: $(STAMP)  ## after `make run`: the report's tables, and $(OUT)/report.html to open in a browser
	@$(BIN)/harvester report $(OUT)
	@$(BIN)/harvester report $(OUT) --html $(OUT)/report.html

# The tests start real servers (tinyproxy, Ceph's object gateway) and a browser (Chromium) from
# Debian's packages, the bench nginx and curl: .ci/system-packages checks them first (a few ms),
# installs what is missing as root, else stops at once with the apt-get command to run.
packages-test packages-bench: packages-%:
	@.ci/system-packages $*

test: packages-test $(STAMP)  ## lint, type-check and the whole test suite
	$(BIN)/ruff check harvester tests bench
	$(BIN)/ruff format --check harvester tests bench
	$(BIN)/mypy
	$(BIN)/mypy --follow-imports=silent bench
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check harvester tests bench
	$(BIN)/ruff format --check harvester tests bench

# bench/ is checked on its own: it imports tests' helpers, whose own typing is not the bench's.
typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --follow-imports=silent bench

# Not part of `make test`: about 20 minutes with the defaults. Knobs: BENCH_N (20000),
# BENCH_RUNS (5), BENCH_ONLY (speed,memory,large,s3,slow,rps,overload,compact,cluster),
# BENCH_LARGE_N (1000), BENCH_LARGE_RUNS (3), BENCH_NIGHTS (365), BENCH_OUT (bench-out),
# BENCH_OVERLOAD_N (2000); e.g. `BENCH_N=2000 BENCH_RUNS=1 BENCH_ONLY=speed make bench` or
# `BENCH_LARGE_N=100 BENCH_LARGE_RUNS=1 BENCH_ONLY=large make bench` for a quick look. Outputs
# go to a tmpfs it mounts (as root; else /dev/shm), each deleted before the next contender.
bench: packages-bench $(STAMP)  ## harvester vs curl and plain.py on loopback (small and ~1 MB images), memory, slow links, --rps, overload
	$(BIN)/python bench/run.py

lock: $(STAMP)  ## re-pin requirements.lock from the current .venv
	{ echo "# Every package the project installs, pinned: runtime and development tools."; \
	  echo "# Used as pip constraints by the Makefile; refresh with 'make lock'."; \
	  $(BIN)/python -m pip freeze --exclude-editable; } > requirements.lock

clean:
	rm -rf $(VENV) $(OUT) sandbox-out .mypy_cache .ruff_cache .pytest_cache .hypothesis
