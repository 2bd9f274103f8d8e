# Front doors. `make bench` and `make test` create the environment on first use.
# Point VISUAL_SEARCH_DATA / VISUAL_SEARCH_MODELS at local copies (see README); without them,
# datasets and weights are downloaded on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup bench test test-fast benchmark lint format clean

setup: $(STAMP)

# Re-install whenever pyproject.toml changes. torch/torchvision first: they are pinned to the
# wheels this project is tested with, and installing them alone keeps pip from looking further.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

bench: setup
	$(PY) experiments/run.py $(ARGS)

test: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -ra -m "not slow" $(PYTEST_ARGS)

benchmark: setup
	$(PY) experiments/benchmark_embed.py $(ARGS)
	$(PY) experiments/benchmark_index.py

lint: setup
	$(PY) -m ruff check src experiments tests
	$(PY) -m ruff format --check src experiments tests

format: setup
	$(PY) -m ruff format src experiments tests
	$(PY) -m ruff check --fix src experiments tests

clean:
	rm -rf outputs multirun .pytest_cache
