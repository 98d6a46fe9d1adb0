#!/usr/bin/env bash
# Install moe_lab and its development tools into the current Python environment.
# Without an NVIDIA GPU, torch comes from PyTorch's CPU wheel index: an unpinned `pip install torch`
# would pull several GB of CUDA libraries that a CPU machine cannot use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "torch>=2.6"
  else
    "$PY" -m pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$PY" -m pip install -e ".[dev]"
