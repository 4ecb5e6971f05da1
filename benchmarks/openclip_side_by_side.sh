#!/usr/bin/env bash
# ito_jax vs open_clip on the bench_s shape (see openclip_side_by_side.py).
# Builds open_clip's own venv (benchmarks/.venv-openclip, gitignored) on first use:
# a benchmark dependency only, never part of requirements.txt.
#   bash benchmarks/openclip_side_by_side.sh [--rounds=6 --steps=3 --torch_compile ...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=benchmarks/.venv-openclip
ITO_PYTHON=${ITO_PYTHON:-.venv/bin/python}
[ -x "$ITO_PYTHON" ] || ITO_PYTHON=$(command -v python3)
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, importlib.util as u; assert u.find_spec('open_clip')" 2>/dev/null; then
  python3.11 -m venv "$VENV"
  # torch 2.13.0 exactly: pip takes the CPU wheel on this machine's disk; a bare
  # `torch` would pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q torch==2.13.0
  # open_clip without its declared torchvision/timm: PyPI's torchvision does not
  # load beside this torch build, and the model code needs neither (the driver
  # enters open_clip below its __init__, which imports the image transforms).
  "$VENV/bin/pip" install -q --no-deps open_clip_torch==3.3.0
  "$VENV/bin/pip" install -q numpy==2.4.6 regex ftfy tqdm huggingface_hub safetensors
fi
exec "$ITO_PYTHON" benchmarks/openclip_side_by_side.py --ito_python="$ITO_PYTHON" \
  --openclip_python="$VENV/bin/python" "$@"
