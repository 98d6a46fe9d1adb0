#!/usr/bin/env bash
# Build the MegaBlocks backend's packages against the torch already installed, on a CUDA machine.
#
# `pip install 'moe_lab[gpu]'` installs MegaBlocks 0.10.0, which pins torch 2.7.0. For any other
# torch, this builds MegaBlocks 0.10.0, grouped_gemm 0.3.0 and stanford-stk 0.7.1 from their sdists
# with --no-deps --no-build-isolation (so the installed torch stays), after one patch: CUDA 13's CUB
# (CCCL 3) dropped the `debug_synchronous` argument MegaBlocks passes to cub::DeviceScan.
# These steps (from local sdists) built and passed the `gpu` tests on an H100 with torch
# 2.11.0+cu130 and nvcc 13.0, in about 90 s on 16 cores.
#
#   bash scripts/build_megablocks.sh            # downloads the sdists from PyPI
#   SDISTS=dir bash scripts/build_megablocks.sh # or takes them from dir (machines without network)
#   WHEELS=dir ...                               # where the wheels go (default: a temporary folder)
set -euo pipefail
PY=${PYTHON:-python3}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'MegaBlocks needs CUDA'" || exit 1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c \
  "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
work=$(mktemp -d)
wheels=${WHEELS:-$work/wheels}
mkdir -p "$wheels"
if [ -n "${SDISTS:-}" ]; then
  cp "$SDISTS"/megablocks-0.10.0.tar.gz "$SDISTS"/grouped_gemm-0.3.0.tar.gz \
    "$SDISTS"/stanford_stk-0.7.1.tar.gz "$work"
else
  "$PY" -m pip download --no-deps --no-binary=:all: --no-build-isolation -d "$work" \
    megablocks==0.10.0 grouped_gemm==0.3.0 stanford-stk==0.7.1
fi
cd "$work"
for f in *.tar.gz; do tar xzf "$f"; done
perl -0pi -e 's/stream,\s*debug_synchronous\)\)/stream))/g' megablocks-0.10.0/csrc/cumsum.h
for src in stanford_stk-0.7.1 grouped_gemm-0.3.0 megablocks-0.10.0; do
  echo "building $src (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$wheels" "./$src"
done
"$PY" -m pip install --no-deps "$wheels"/*.whl
"$PY" -c "import grouped_gemm; from megablocks.layers.dmoe import ParallelDroplessMLP"
echo "installed; wheels in $wheels"
