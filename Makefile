# moe-exp: `make run` and `make test` do all setup on a fresh machine.
# VENV is where the (~6 GB) environment lives; CI points it at one folder outside the clone.
VENV ?= .venv
PYTHON ?= python3.11
BIN := $(VENV)/bin
ARGS ?=

# Reinstall only what changed: torch when its pins change, the rest when pyproject changes
# or the venv is used from another checkout (editable installs point at one clone).
TORCH_STAMP := $(VENV)/.torch-$(shell cat requirements/torch.txt | sha1sum | cut -c1-12)
DEPS_STAMP := $(VENV)/.deps-$(shell (cat pyproject.toml; echo $(CURDIR)) | sha1sum | cut -c1-12)

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow lint bench ablations sync clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(TORCH_STAMP): requirements/torch.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements/torch.txt
	rm -f $(VENV)/.torch-* && touch $@

$(DEPS_STAMP): pyproject.toml $(TORCH_STAMP)
	$(BIN)/pip install -q -c requirements/torch.txt -e '.[dev]'
	rm -f $(VENV)/.deps-* && touch $@

install: $(DEPS_STAMP) ## create the environment in $(VENV) (if missing) and install moe-exp

run: install ## run the default experiment (shapes & colours); extra overrides via ARGS="..."
	$(BIN)/moe-exp $(ARGS)

test: install ## run the default (fast) test suite
	$(BIN)/pytest -q $(ARGS)

test-slow: install ## run the slow tests (real ablations)
	$(BIN)/pytest -q -m slow $(ARGS)

lint: install ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install ## benchmarks: default run end to end, Lightning vs bare loop
	$(BIN)/python benchmarks/bench_default_run.py

ABLATIONS ?=

ablations: install ## run the ablation presets (all, or ABLATIONS="a b") and their verdicts
	$(BIN)/python -m moe_exp.analysis.reproduce $(ABLATIONS)

sync: install ## upload offline W&B runs under outputs/ (needs a network and WANDB_API_KEY)
	@runs=$$(find outputs -type d -name 'offline-run-*' 2>/dev/null); \
	if [ -z "$$runs" ]; then echo "no offline W&B runs under outputs/"; \
	else $(BIN)/wandb sync $$runs; fi

clean: ## remove caches (not the environment, not outputs/)
	rm -rf build dist .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
