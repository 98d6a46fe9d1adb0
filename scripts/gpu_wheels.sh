#!/usr/bin/env bash
# The Python packages moe_lab needs that the lent GPU machine's image lacks (it has torch,
# transformers, scikit-learn, tokenizers, safetensors, matplotlib; nothing can be downloaded there),
# as wheels for its Python 3.12 in .whl/ (ignored by git), at the versions installed here.
# scripts/gpu_check.sh installs them there. Run here, from anywhere: bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
rm -f .whl/*.whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  "omegaconf==$(version omegaconf)" "datasets==$(version datasets)" "dill==$(version dill)" \
  "multiprocess==$(version multiprocess)" "faiss-cpu==$(version faiss-cpu)"
# omegaconf's parser runtime is published as an sdist only: build its (pure Python) wheel here
"$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
du -ch .whl/*.whl
