# lordo: two commands do everything on a fresh machine.
#   make reproduce   the default reproduction: every notebook on the `cpu` preset -> results/, paper_figures/
#   make test        lint, unit + distributed tests, and every notebook through nbmake
# Both create or update the local virtual environment .venv first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= cpu
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: env test lint reproduce sweep paper lab bench clean

env: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (lordo)" >/dev/null
	$(BIN)/python -c "import lordo.kernels as k; k.lowrank_cpu()"   # compile the CPU kernels once, here
	touch $(STAMP)

lint: env
	$(BIN)/ruff check lordo tests benchmarks notebooks

test: lint
	$(BIN)/pytest -q tests
	$(BIN)/pytest -q --nbmake --nbmake-timeout=300 notebooks

reproduce: env
	$(BIN)/python -m lordo.reproduce --preset $(PRESET)

# Recompute notebook 06's cached tables: the lr sweep at the claim-4 regime and the local-update penalty study
# (sweeps/<preset>/; about five hours on the cpu preset; runs already in runs/ are reused). `make reproduce` reads the committed tables instead.
sweep: env
	$(BIN)/python -m lordo.sweep --preset $(PRESET) --recompute
	$(BIN)/python -m lordo.penalty --preset $(PRESET) --recompute

paper: PRESET = paper
paper: reproduce

# JupyterLab on the notebooks at PORT; it opens no browser where there is no display (or with NO_BROWSER=1),
# printing the URL to open or tunnel instead: `make lab PORT=9999 NO_BROWSER=1`.
# jupyter refuses to run as root without --allow-root (containers, CI machines)
PORT ?= 8888
NO_BROWSER ?= $(if $(DISPLAY)$(WAYLAND_DISPLAY),,1)
lab: env
	$(BIN)/jupyter lab notebooks --port=$(PORT) $(if $(filter 1,$(NO_BROWSER)),--no-browser) $(if $(filter 0,$(shell id -u)),--allow-root)

bench: env
	$(BIN)/python benchmarks/optimizer_step.py
	$(BIN)/python benchmarks/projection_refresh.py
	$(BIN)/python benchmarks/trainer_throughput.py

# Removes executed notebooks, result tables and tool caches; never the cached runs (runs/), the cached sweeps (sweeps/)
# or prepared data (data/cache/).
clean:
	rm -rf results .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
