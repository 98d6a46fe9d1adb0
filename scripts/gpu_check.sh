#!/usr/bin/env bash
# Everything moe_lab measures on a GPU, as one prepared script: run it on a CUDA machine from the
# repository root, after building here what it carries there:
#   bash scripts/gpu_wheels.sh             # .whl/: packages the GPU image may lack
#   python scripts/build_gpu_corpus.py     # data/gpu-corpus/: the preset's corpus (~4 min)
#   python scripts/build_gpu_tokenizer.py  # data/gpu-corpus/tokenizer.json (~1 min)
#   bash scripts/gpu_check.sh [STAGE ...]  # stages: tests bench preset (default: all three)
# tests:  the `gpu` tests (grouped and MegaBlocks backends against the reference, compile)
# bench:  bench/moe_gpu.py: dense vs reference vs grouped vs MegaBlocks, layer and step, MFU
# preset: configs/experiments/gpu-compare.yaml end to end, training, evaluation and report
# Results go to $OUT (default runs/gpu-check): a log per stage, moe_gpu.json, and compare.tar.gz
# (report.md, results.json, plots). Each stage has its own time limit, so that a stuck stage
# still leaves the others' results: tests 5 min, bench 5 min, preset 8 min (the issue's target).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MOE_LAB_CACHE=${MOE_LAB_CACHE:-/tmp/moe_lab_cache}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the wheels of scripts/gpu_wheels.sh, where moe_lab's dependencies do not import
if ! python3 -c "import omegaconf, datasets, faiss" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null
then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.log"
status=0
for stage in "${@:-tests bench preset}"; do
  for s in $stage; do
    started=$SECONDS
    case $s in
      tests)
        timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 \
          | tee "$OUT/gpu_tests.log" ;;
      bench)
        timeout 300 python3 bench/moe_gpu.py --out "$OUT/moe_gpu.json" 2>&1 \
          | tee "$OUT/moe_gpu.log" ;;
      preset)
        rm -rf runs/gpu-compare
        timeout 480 python3 -m moe_lab compare --config configs/experiments/gpu-compare.yaml \
          2>&1 | tee "$OUT/compare.log"
        (cd runs/gpu-compare && tar czf - report.md results.json ./*.png) >"$OUT/compare.tar.gz" ;;
      *) echo "unknown stage $s: tests, bench or preset" >&2; exit 2 ;;
    esac
    rc=${PIPESTATUS[0]}
    echo "stage $s: exit $rc after $((SECONDS - started)) s" | tee -a "$OUT/env.log"
    [ "$rc" -eq 0 ] || status=$rc
  done
done
exit $status
