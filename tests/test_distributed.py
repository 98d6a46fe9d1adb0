"""Data parallelism with real processes: torchrun, gloo, world size 2, through the CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moe_lab.checkpoint import latest_checkpoint
from moe_lab.metrics import read_metrics

ARGS = [
    "train.max_steps=4",
    "train.seq_len=64",
    "train.progress=false",
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


def moe_lab(*args, world=1):
    launcher = [sys.executable, "-m", "moe_lab"]
    if world > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += [f"--nproc_per_node={world}", "-m", "moe_lab"]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300)


def losses(run):
    return [(r["loss"], r["grad_norm"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    single = moe_lab("train", *ARGS, "train.batch_size=4", f"run.dir={root / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = moe_lab(
        "train", *ARGS, "train.batch_size=2", "parallel.dp=ddp", f"run.dir={root / 'ddp'}", world=2
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = moe_lab(
        "train",
        *ARGS,
        "train.batch_size=2",
        "parallel.dp=fsdp2",
        f"run.dir={root / 'fsdp2'}",
        world=2,
    )
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    out = moe_lab("train", *ARGS, *MOE, "train.batch_size=4", f"run.dir={root / 'moe'}")
    assert out.returncode == 0, out.stderr[-3000:]
    for mode, extra in (("moe-ddp", []), ("moe-ep", ["parallel.ep=true"])):
        extra = [*MOE, *extra, "train.batch_size=2", "parallel.dp=ddp"]
        out = moe_lab("train", *ARGS, *extra, f"run.dir={root / mode}", world=2)
        assert out.returncode == 0, out.stderr[-3000:]
    return root, ddp


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one_process_with_the_global_batch(runs, mode):
    root, ddp = runs
    one, two = losses(root / "single"), losses(root / mode)
    assert len(one) == len(two) == 4
    for (l1, g1), (l2, g2) in zip(one, two, strict=True):
        assert abs(l1 - l2) < 1e-6 and abs(g1 - g2) < 1e-5
    w1 = load_file(latest_checkpoint(root / "single" / "checkpoints") / "model.safetensors")
    if mode == "fsdp2":  # sharded (DCP) checkpoints, converted into the one-file format
        assert not (latest_checkpoint(root / mode / "checkpoints") / "model.safetensors").exists()
        converted = moe_lab("convert", str(root / mode))
        assert converted.returncode == 0, converted.stderr[-3000:]
    w2 = load_file(latest_checkpoint(root / mode / "checkpoints") / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:  # Adam amplifies rounding in near-zero gradients: compare whole tensors
        assert (w1[k] - w2[k]).norm() <= 1e-4 * w1[k].norm(), k
    evaluation = json.loads((root / mode / "eval.json").read_text())
    single = json.loads((root / "single" / "eval.json").read_text())
    assert abs(evaluation["valid"]["overall"]["loss"] - single["valid"]["overall"]["loss"]) < 1e-5


def test_only_rank_0_reports_and_tokens_count_every_rank(runs):
    root, ddp = runs
    assert ddp.stdout.count("trained 4 steps") == 1  # rank 0 alone reports and writes
    evaluation = json.loads((root / "ddp" / "eval.json").read_text())
    assert evaluation["tokens"] == 4 * 4 * 64  # global tokens: 2 ranks x 2 sequences x 4 steps


def test_fsdp2_resumes_exactly_from_its_sharded_checkpoint(runs):
    """(DDP's resume is covered by the expert-parallel one below, which runs under DDP.)"""
    root, _ = runs
    resumed = root / "fsdp2-resumed"
    shutil.copytree(root / "fsdp2", resumed)
    shutil.rmtree(latest_checkpoint(resumed / "checkpoints"))  # interrupted after step 2
    args = [*ARGS, "train.batch_size=2", "parallel.dp=fsdp2", "run.resume=true"]
    out = moe_lab("train", *args, f"run.dir={resumed}", world=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(resumed) == losses(root / "fsdp2")


def test_torchrun_without_a_parallel_mode_is_a_clear_error(tmp_path):
    out = moe_lab("train", *ARGS, f"run.dir={tmp_path}", world=2)
    assert out.returncode != 0 and "set parallel.dp=ddp" in out.stderr


@pytest.mark.parametrize("mode", ["moe-ddp", "moe-ep"])
def test_moe_on_two_processes_matches_one_process(runs, mode):
    """Replicated (DDP) and expert-parallel experts; the balancing bias follows the global load."""
    root, _ = runs
    one, two = losses(root / "moe"), losses(root / mode)
    assert len(one) == len(two) == 4
    for (l1, g1), (l2, g2) in zip(one, two, strict=True):
        assert abs(l1 - l2) < 1e-6 and abs(g1 - g2) < 1e-5
    w1 = load_file(latest_checkpoint(root / "moe" / "checkpoints") / "model.safetensors")
    w2 = load_file(latest_checkpoint(root / mode / "checkpoints") / "model.safetensors")
    assert w1.keys() == w2.keys()  # expert-parallel: every rank's experts gathered into one file
    biases = [k for k in w1 if k.endswith("expert_bias")]
    assert sum(w1[k].abs().sum() for k in biases) > 0  # the balancing bias did move
    for k in w1:
        assert w1[k].shape == w2[k].shape
        if k in biases:  # moved by whole steps of 0.01 from integer counts
            assert torch.equal(w1[k], w2[k]), k
        else:
            assert (w1[k] - w2[k]).norm() <= 1e-4 * w1[k].norm(), k


def test_expert_parallel_resumes_exactly(runs):
    root, _ = runs
    resumed = root / "moe-ep-resumed"
    shutil.copytree(root / "moe-ep", resumed)
    shutil.rmtree(latest_checkpoint(resumed / "checkpoints"))  # interrupted after step 2
    args = [*ARGS, *MOE, "train.batch_size=2", "parallel.dp=ddp", "parallel.ep=true"]
    args.append("run.resume=true")
    out = moe_lab("train", *args, f"run.dir={resumed}", world=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(resumed) == losses(root / "moe-ep")
