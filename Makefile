# fastav: every target creates or reuses .venv (scripts/setup_venv.sh) except gpu-test, which runs on a
# lent GPU machine with the image's python3 and the carried packages on PYTHONPATH (../shared/tools/gpu-wheels).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastav-installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=
GPU_PY ?= python3

.PHONY: demo test lint format bench gpu-test setup clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(PY) $(VENV)
	touch $@

# The main job on its built-in default: the synthetic dataset (3 categories = 3 continual tasks).
demo: $(STAMP)
	$(BIN)/python -m shards synth --out $(DEMO_DIR)/data --categories 3 --classes-per-category 4 --clips-per-class 24

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/kernels.py --quick
	$(BIN)/python bench/throughput.py --data-only --audio

gpu-test:
	PYTHONPATH=$(CURDIR):$$PYTHONPATH $(GPU_PY) -m pytest -m gpu -p no:cacheprovider $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)
