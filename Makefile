# `make run`: build the environment, execute every notebook here, print the scoreboard.
# `make test`: build the environment, lint (ruff), unit tests, then every notebook under nbval.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

.PHONY: run test lint check unit nbval lab sync env clean

run: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py $(NOTEBOOKS)
	$(BIN)/python scripts/scoreboard.py

test: lint check

# The package, scripts, tests and the notebooks' py:percent twins (rules and line length: pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check recipes_lib scripts tests notebooks/*.py

# Two test files at a time (pytest-xdist, one file per worker), as for the notebooks.
unit: $(STAMP)
	$(BIN)/python -m pytest tests -q -n 2 --dist loadfile

# --nbval-lax: run every cell and fail on any error (a failed assert included) without comparing
# outputs, which are committed from a GPU run and differ from a CPU's by design. Two notebooks at a
# time (pytest-xdist, one file per worker), one thread each: 9 min instead of 12.5 on 2 cores.
nbval: $(STAMP)
	RECIPES_PROGRESS=0 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile \
		--nbval-lax --nbval-current-env --nbval-cell-timeout=900 $(NOTEBOOKS)

# What `make test` runs after lint: the unit tests and the notebooks in one pytest session, two files
# at a time, the notebooks handed out first, so the 2-process launches of the unit tests fill the
# gaps beside the longest notebooks instead of waiting for them (one thread per worker).
check: $(STAMP)
	RECIPES_PROGRESS=0 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile \
		--nbval-lax --nbval-current-env --nbval-cell-timeout=900 $(NOTEBOOKS) tests

lab: $(STAMP)
	$(BIN)/python -m pip install -q jupyterlab jupytext
	$(BIN)/jupyter lab notebooks/

# Re-pair notebooks/*.ipynb with their reviewable py:percent twins after editing either.
sync: $(STAMP)
	$(BIN)/jupytext --sync notebooks/*.py

env: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	# torchao offloads optimizer state from a GPU only: install it where there is one.
	if $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(BIN)/python -m pip install -q "torchao>=0.12"; fi
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (recipes)" >/dev/null
	touch $@

clean:
	rm -rf $(VENV) outputs .pytest_cache
