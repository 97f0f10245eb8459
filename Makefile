# SPDX-License-Identifier: GPL-2.0-only
# Two commands do everything: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_ARGS ?=
KERNEL ?= 6.12
PYTEST_ARGS ?=
# make fuzz: inputs per fuzz target, mutants per kernel through a live node, hypothesis examples.
FUZZ_INPUTS ?= 1000000
HOSTILE_N ?= 100000
FUZZ_EXAMPLES ?= 1000

# make soak: seconds of the 256-file load, kill cycles.
SOAK_SECONDS ?= 60
SOAK_CYCLES ?= 10000

.PHONY: install run test fuzz soak bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install-deps.sh
	scripts/install-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: install
	$(PY) -m cusetpm serve --node auto --kernel $(KERNEL) $(RUN_ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The long hostile-input runs (issue 10); each prints its figures.
fuzz: install
	$(PY) scripts/fuzz.py --inputs $(FUZZ_INPUTS)
	CUSETPM_HOSTILE_N=$(HOSTILE_N) CUSETPM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -p no:cacheprovider \
		tests/test_hostile_node.py tests/test_fuzz_core.py tests/test_fuzz_cuse_proto.py

# The long load runs (issue 10, and the soak-marked tests); each prints its figures.
soak: install
	CUSETPM_SOAK_SECONDS=$(SOAK_SECONDS) CUSETPM_SOAK_CYCLES=$(SOAK_CYCLES) $(PY) -m pytest -q -s -p no:cacheprovider \
		tests/test_load.py
	$(PY) -m pytest -q -s -p no:cacheprovider -m soak

bench: install
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
