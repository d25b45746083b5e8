#!/usr/bin/env bash
# Installs ocula with its test extras on a fresh machine (CPU torch first, so pip never pulls CUDA wheels),
# then the transformers oracle's optional torchvision, patched to import on CPU-only torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,video,serve,hub]"
# transformers' Qwen2-VL / LLaVA-OV video processors need torchvision (tests only; ocula never imports it).
# PyPI's build registers CUDA ops at import; its transforms are pure torch, so empty the two registration files.
if ! python -c "import torchvision" >/dev/null 2>&1; then
  python -m pip install -q --no-deps torchvision==0.28.0
  tv=$(python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('torchvision').origin))")
  : > "$tv/_meta_registrations.py"
  : > "$tv/_autograd_registrations.py"
  python -c "import torchvision.transforms.v2.functional"
fi
