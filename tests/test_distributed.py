"""Data parallelism with real processes: torchrun, gloo, world size 2, through the CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moe_lab.config import ConfigError
from moe_lab.store.checkpoint import latest_checkpoint
from moe_lab.store.metrics import read_metrics
from moe_lab.train.distributed import setup

ARGS = [
    "run.device=cpu",  # gloo on CPU: fp32 and deterministic, so one process is matched exactly
    "train.max_steps=4",
    "train.seq_len=64",
    "train.progress=false",
    "train.eval_batch_size=32",  # the final evaluation: not the 1-2 sequences per rank of training
    "train.lr=1e-3",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=3",
]

MOE = [  # 4 experts, so each of 2 expert-parallel ranks holds 2
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_hidden=32",
    # the balancing loss and the aux-loss-free bias must both follow the load of all ranks
    "model.moe.bias_update_rate=0.01",
    "model.moe.lbl_weight=0.1",
]


MOE_GLOBAL = [*MOE, "model.moe.lbl_granularity=global_batch", "train.grad_accum=2"]

# The multi-process runs, name -> (processes, arguments): global batch 4, like their
# one-process references "single" (dense) and "moe", which take the batch of 4 in one process.
# The "ep2-of-4" runs split each copy of the experts over 2 ranks and keep 2 copies.
EP2 = [*MOE, "train.batch_size=1", "parallel.ep=true", "parallel.ep_degree=2"]
PARALLEL = {
    "ddp": (2, ["train.batch_size=2", "parallel.dp=ddp"]),
    "fsdp2": (2, ["train.batch_size=2", "parallel.dp=fsdp2"]),
    "moe-ddp": (2, [*MOE, "train.batch_size=2", "parallel.dp=ddp"]),
    "moe-ep": (2, [*MOE, "train.batch_size=2", "parallel.dp=ddp", "parallel.ep=true"]),
    "moe-ep2-of-4": (4, [*EP2, "parallel.dp=ddp"]),
    "moe-ep2-of-4-fsdp2": (4, [*EP2, "parallel.dp=fsdp2"]),
    # balancing over the global batch: two micro-batches accumulated, loads summed over both
    # ranks and both micro-batches; the reference "moe-global" takes 2 x 2 sequences alone
    "moe-global-ddp": (2, [*MOE_GLOBAL, "train.batch_size=1", "parallel.dp=ddp"]),
    # rank 0 alone builds a model to evaluate mid-run: that must not move its generator
    "moe-fsdp2-jitter-eval": (
        2,
        [
            *MOE,
            "train.batch_size=2",
            "parallel.dp=fsdp2",
            "model.moe.jitter=0.2",
            "train.eval_every=2",
        ],
    ),
}
SHARDED = {"fsdp2", "moe-ep2-of-4-fsdp2", "moe-fsdp2-jitter-eval"}  # DCP: converted before read


def moe_lab(*args, world=1):
    launcher = [sys.executable, "-m", "moe_lab"]
    if world > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += [f"--nproc_per_node={world}", "-m", "moe_lab"]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300)


def train(run_dir, *args, world=1):
    out = moe_lab("train", *ARGS, *args, f"run.dir={run_dir}", world=world)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run):
    return [(r["loss"], r["grad_norm"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def weights(run):
    checkpoint = latest_checkpoint(run / "checkpoints")
    if run.name in SHARDED:  # the one-file format from each rank's shards
        assert (checkpoint / "sharded").is_dir()
        if not (checkpoint / "model.safetensors").exists():
            converted = moe_lab("convert", str(run))
            assert converted.returncode == 0, converted.stderr[-3000:]
    return load_file(checkpoint / "model.safetensors")


def assert_same_training(one, two):
    """Losses within 1e-6 and grad norms within 1e-5 at every step; the final weights the same
    (balancing biases exactly: they move by whole steps from integer counts)."""
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4
    for (l1, g1), (l2, g2) in zip(a, b, strict=True):
        assert abs(l1 - l2) < 1e-6 and abs(g1 - g2) < 1e-5
    w1, w2 = weights(one), weights(two)
    assert w1.keys() == w2.keys()  # sharded weights or experts gathered into the one-file format
    for k in w1:  # Adam amplifies rounding in near-zero gradients: compare whole tensors
        assert w1[k].shape == w2[k].shape
        if k.endswith("expert_bias"):
            assert torch.equal(w1[k], w2[k]), k
        else:
            assert (w1[k] - w2[k]).norm() <= 1e-4 * w1[k].norm(), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    train(root / "single", "train.batch_size=4")
    train(root / "moe", *MOE, "train.batch_size=4")
    train(root / "moe-global", *MOE_GLOBAL, "train.batch_size=2")
    out = {name: train(root / name, *args, world=n) for name, (n, args) in PARALLEL.items()}
    return root, out["ddp"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one_process_with_the_global_batch(runs, mode):
    root, ddp = runs
    assert_same_training(root / "single", root / mode)
    evaluation = json.loads((root / mode / "eval.json").read_text())
    single = json.loads((root / "single" / "eval.json").read_text())
    assert abs(evaluation["valid"]["overall"]["loss"] - single["valid"]["overall"]["loss"]) < 1e-5


def test_only_rank_0_reports_and_tokens_count_every_rank(runs):
    root, ddp = runs
    assert ddp.stdout.count("trained 4 steps") == 1  # rank 0 alone reports and writes
    evaluation = json.loads((root / "ddp" / "eval.json").read_text())
    assert evaluation["tokens"] == 4 * 4 * 64  # global tokens: 2 ranks x 2 sequences x 4 steps


def test_resuming_with_another_number_of_processes_is_a_clear_error(runs, tmp_path):
    root, _ = runs
    shutil.copytree(root / "ddp", tmp_path / "ddp")
    out = moe_lab(
        "train", *ARGS, *PARALLEL["ddp"][1], f"run.dir={tmp_path / 'ddp'}", "run.resume=true"
    )
    assert out.returncode == 2 and "saved by 2 processes and this run has 1" in out.stderr


def test_torchrun_without_a_parallel_mode_is_a_clear_error(tmp_path):
    out = moe_lab("train", *ARGS, f"run.dir={tmp_path}", world=2)
    assert out.returncode != 0 and "set parallel.dp=ddp" in out.stderr


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """Found on a 1-GPU machine: rank 1 died in torch.cuda.set_device with 'invalid device
    ordinal'. (The tests above run there too: run.device=cpu puts them on gloo.)"""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"local rank 1 has no GPU .* set run\.device=cpu"):
        setup("ddp")


@pytest.mark.parametrize("mode", ["moe-ddp", "moe-ep", "moe-ep2-of-4", "moe-ep2-of-4-fsdp2"])
def test_moe_on_several_processes_matches_one_process(runs, mode):
    """Replicated (DDP) and expert-parallel experts (one copy over all ranks, or two copies over
    two ranks each), the rest replicated (DDP) or sharded (FSDP2); the balancing bias follows
    the global load."""
    root, _ = runs
    biases = [v for k, v in weights(root / "moe").items() if k.endswith("expert_bias")]
    assert sum(b.abs().sum() for b in biases) > 0  # the balancing bias did move
    assert_same_training(root / "moe", root / mode)


def test_global_batch_balancing_on_two_processes_matches_one_process(runs):
    root, _ = runs
    assert_same_training(root / "moe-global", root / "moe-global-ddp")


@pytest.mark.parametrize(
    "mode", ["fsdp2", "moe-ep2-of-4", "moe-ep2-of-4-fsdp2", "moe-fsdp2-jitter-eval"]
)
def test_resume_is_exact_at_equal_world_size(runs, mode):
    """From FSDP2's sharded checkpoint, from expert-parallel's gathered one (under DDP, so this
    covers DDP's resume too), from FSDP2's where the experts are row shards of the ep mesh
    dimension, replicated over the other, and with router jitter and mid-run evaluations."""
    root, _ = runs
    resumed = root / f"{mode}-resumed"
    shutil.copytree(root / mode, resumed)
    shutil.rmtree(latest_checkpoint(resumed / "checkpoints"))  # interrupted after step 2
    world, args = PARALLEL[mode]
    train(resumed, *args, "run.resume=true", world=world)
    assert losses(resumed) == losses(root / mode)


@pytest.mark.parametrize("mode", ["fsdp2", "moe-ep2-of-4-fsdp2"])
def test_a_sharded_checkpoint_holds_no_pickle(runs, mode, tmp_path):
    """Every file of FSDP2's sharded checkpoints is JSON or safetensors (store.sharded_format),
    one safetensors file per rank that wrote chunks; moe-lab convert reads them back."""
    from safetensors import safe_open

    from moe_lab.store.checkpoint import convert_checkpoint

    root, _ = runs
    ckpt = latest_checkpoint(root / mode / "checkpoints")
    files = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert files[0] == "index.json" and all(f.endswith(".safetensors") for f in files[1:])
    assert len(files) - 1 == PARALLEL[mode][0]  # every rank wrote its shards
    json.loads((ckpt / "sharded" / "index.json").read_text())
    for f in files[1:]:
        with safe_open(ckpt / "sharded" / f, "pt") as opened:
            assert list(opened.keys())
    copy = tmp_path / "run" / "checkpoints" / ckpt.name  # convert writes next to the shards
    shutil.copytree(ckpt, copy)
    shutil.copy(root / mode / "config.yaml", tmp_path / "run" / "config.yaml")
    weights = load_file(convert_checkpoint(copy))
    assert all(torch.isfinite(v).all() for v in weights.values())
