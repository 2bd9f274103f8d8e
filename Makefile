# Front doors. `make bench` and `make test` create the environment on first use.
# Point VISUAL_SEARCH_DATA / VISUAL_SEARCH_MODELS at local copies (see README); without them,
# datasets and weights are downloaded on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup browser bench serve report paper test test-fast benchmark lint format clean

setup: $(STAMP)

# Re-install whenever pyproject.toml changes. torch/torchvision first: they are pinned to the
# wheels this project is tested with, and installing them alone keeps pip from looking further.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	# Strip notebook outputs on commit (a git filter; .gitattributes names the files).
	if git rev-parse --git-dir >/dev/null 2>&1; then $(VENV)/bin/nbstripout --install; fi
	touch $(STAMP)

# The browser test drives Debian's chromium through chromedriver. Installed when missing and
# this user may install packages (CI runs as root); otherwise the test says what to install.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: install chromium and chromium-driver for the browser test"; fi

bench: setup
	$(PY) experiments/run.py $(ARGS)

# Figures and tables from the tracked runs into reports/$(NAME)/, and the README's results block.
NAME ?= latest
report: setup
	$(PY) experiments/report.py --name $(NAME) --readme README.md $(ARGS)

# From nothing to a finished report: both studies (every cache re-used), then the report.
paper: setup
	$(PY) experiments/run.py -m experiment=roi_study
	$(PY) experiments/run.py -m experiment=index_sweep
	$(MAKE) report

# The web app, serving the best tracked run (configs/serve.yaml; ARGS="run_id=..." etc.).
serve: setup
	$(PY) -m visual_search.app serve $(ARGS)

test: setup browser
	$(PY) -m pytest -ra $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -ra -m "not slow" $(PYTEST_ARGS)

benchmark: setup
	$(PY) experiments/benchmark_embed.py $(ARGS)
	$(PY) experiments/benchmark_index.py
	$(PY) experiments/benchmark_serve.py

lint: setup
	$(PY) -m ruff check src experiments tests
	$(PY) -m ruff format --check src experiments tests

format: setup
	$(PY) -m ruff format src experiments tests
	$(PY) -m ruff check --fix src experiments tests

clean:
	rm -rf outputs multirun .pytest_cache
