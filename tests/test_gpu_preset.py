"""The GPU preset is what the scaling issue asked for, checked here without a GPU: the four
variants, bf16 and compile, a 50-150M model, 1000x the CPU default's budget, and a plan that
reaches that budget within its tolerance; and the device script is valid shell."""

import subprocess
from pathlib import Path

from moe_lab.accounting import estimate
from moe_lab.compare import load_experiment
from moe_lab.compare.plan import plan

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "experiments" / "gpu-compare.yaml"


def test_the_gpu_preset_compares_the_four_variants_at_1000x_the_cpu_budget(tmp_path):
    gpu = load_experiment(PRESET, [f"dir={tmp_path}"])
    cpu = load_experiment(ROOT / "configs" / "experiments" / "default.yaml")
    assert gpu.budgets[0] >= 1000 * cpu.budgets[0]
    assert len(gpu.seeds) >= 2  # paired differences need two seeds
    plans = plan(gpu, tmp_path)
    assert list(plans) == ["dense", "moe-8x704-top2", "cbtm-4", "cbtm-4-random"]
    dense = plans["dense"]["config"]
    assert dense.train.precision == "bf16" and dense.train.compile
    assert 50e6 <= estimate(dense.model).total_params <= 150e6
    moe = plans["moe-8x704-top2"]["config"].model
    assert moe.moe.backend == "auto"  # grouped on a CUDA GPU
    assert estimate(moe).active_params / estimate(dense.model).active_params - 1 < 1e-3
    real, twin = (v for v in gpu.variants if v.family == "cbtm")
    assert twin.random_clusters and (real.k, real.top_k) == (twin.k, twin.top_k)
    for name, p in plans.items():
        assert abs(p["flops"][gpu.budgets[0]] / gpu.budgets[0] - 1) <= 0.02, name
    assert all(f.startswith("data/gpu-corpus/") for f in dense.data.train_files)


def test_the_device_scripts_are_valid_shell():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)
