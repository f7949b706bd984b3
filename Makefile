# fastav: every target creates or reuses .venv (scripts/setup_venv.sh) except gpu-test, which runs on a
# lent GPU machine with the image's python3 and the packages it lacks (DALI, DeepSpeed, PyAV, ...) installed from
# wheels (docs/gpu.md).
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

# The main job on its built-in default: synthetic data, a short pre-training from scratch, then the continual runs
# of Finetune, ER and STELLA side by side (scripts/demo.sh; METHODS=..., DEMO_DIR=..., PROCS=... to change).
demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) PYTHON=$(BIN)/python bash scripts/demo.sh

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# one run, a table then one JSON line: data and audio rows, the train step (fastav's STELLA / DER++ / Finetune and
# the official STELLA step), end to end, kernel rows; debug size on the CPU, base size (stella_vggsound) on a GPU
bench: $(STAMP)
	$(BIN)/python bench/throughput.py --audio

# kernels at their fixed configs (no tuning benchmarks); the whole GPU check with figures: scripts/gpu_check.sh
gpu-test:
	PYTHONPATH=$(CURDIR):$$PYTHONPATH FASTAV_KERNEL_TUNING=fixed $(GPU_PY) -m pytest -m gpu -p no:cacheprovider $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)
