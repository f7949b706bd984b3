#!/usr/bin/env bash
# Create or update the project's virtual environment, printing each step.
#   scripts/setup_venv.sh [PYTHON] [VENV_DIR]      (defaults: python3.11, .venv)
# Order matters: torch first, then DeepSpeed (a source distribution built against the installed torch with
# --no-build-isolation), then fastav itself (editable) with its remaining dependencies and the dev tools.
set -euo pipefail
py=${1:-python3.11}
venv=${2:-.venv}
if ! command -v "$py" >/dev/null 2>&1; then
  echo "setup: $py not found; fastav needs Python 3.11 or newer (pass PY=/path/to/python3.11 to make)" >&2
  exit 2
fi
"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "setup: $py is $("$py" --version 2>&1); fastav needs Python 3.11 or newer" >&2; exit 2; }
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv with $("$py" --version 2>&1)"
  "$py" -m venv "$venv"
fi
step() { echo "setup: $*"; }
step "pip, setuptools, wheel"
"${pip[@]}" install -q --upgrade "pip>=24" "setuptools>=68,<82" wheel  # torch 2.11 requires setuptools<82
step "torch==2.11.0 torchaudio==2.11.0 (large: CUDA build from PyPI, runs on the CPU too)"
"${pip[@]}" install -q torch==2.11.0 torchaudio==2.11.0
if ! "$venv/bin/python" -c 'import deepspeed, sys; sys.exit(deepspeed.__version__ != "0.19.8")' 2>/dev/null; then
  step "deepspeed==0.19.8 (source build against the installed torch, --no-build-isolation)"
  "${pip[@]}" install -q ninja packaging psutil py-cpuinfo hjson msgpack einops "pydantic>=2"
  "${pip[@]}" install -q --no-build-isolation deepspeed==0.19.8
fi
if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  # DeepSpeed's CPU accelerator compiles a shared-memory communication op (C++, ninja) the first time a process
  # group starts and caches it in ~/.cache/torch_extensions: about a minute that the first `deepspeed` launch on
  # this machine would otherwise spend before its first step. Build it now.
  step "DeepSpeed's CPU communication op (compiled once, cached in ${TORCH_EXTENSIONS_DIR:-~/.cache/torch_extensions})"
  DS_ACCELERATOR=cpu "$venv/bin/python" -c 'import logging; logging.getLogger("torch.utils.cpp_extension").setLevel(40)
from deepspeed.comm.torch import build_shm_op; build_shm_op()' >/dev/null
fi
step "fastav (editable) with DALI, webdataset, PyAV, numpy 2.3, matplotlib, tensorboard, ruff, pytest"
# compat mode: a plain path entry, so every top-level package of the checkout (fastav, kernels, shards) imports
"${pip[@]}" install -q -e ".[dev]" --config-settings editable_mode=compat
step "done: $("$venv/bin/python" -c 'import torch, nvidia.dali, av, numpy; print(f"torch {torch.__version__}, dali {nvidia.dali.__version__}, av {av.__version__}, numpy {numpy.__version__}")')", \
  "deepspeed $("$venv/bin/python" -m pip show deepspeed 2>/dev/null | sed -n 's/^Version: //p')"
