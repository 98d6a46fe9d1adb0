"""Warmup-stable-decay: the schedule in closed form, and a decay branched from a stable trunk
(``train.branch_from``) that equals a whole WSD run of its budget, bit for bit, FLOPs included."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moe_lab.config import ConfigError
from moe_lab.store.checkpoint import latest_checkpoint
from moe_lab.train.loop import train
from moe_lab.train.optim import decay_start, lr_at
from tests.test_train import _cfg as train_cfg


def test_wsd_and_constant_schedules_in_closed_form():
    assert decay_start(100, 0.2) == 80
    for step, expected in [(5, 0.5), (10, 1.0), (80, 1.0), (90, 0.55), (100, 0.1)]:
        assert lr_at(step, 1.0, 10, 100, 0.1, "wsd", 0.2) == pytest.approx(expected)
    assert lr_at(5, 1.0, 10, 100, 0.1, "constant") == pytest.approx(0.5)
    assert lr_at(10_000, 1.0, 10, 100, 0.1, "constant") == 1.0


def _cfg(tmp_path, lang_files, name, *extra):
    # sampling over languages draws from the data RNG: the branch must restore it
    return train_cfg(tmp_path, lang_files, "data.sample_by=lang", *extra, name=name)


def _records(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def test_a_decay_branched_from_the_trunk_equals_a_whole_wsd_run(tmp_path, lang_files):
    wsd = ("train.schedule=wsd", "train.decay_fraction=0.25")
    whole = train(_cfg(tmp_path, lang_files, "whole", "train.max_steps=8", *wsd))
    trunk = train(_cfg(tmp_path, lang_files, "trunk", "train.max_steps=6",
                       "train.schedule=constant"))  # fmt: skip
    branch_from = f"train.branch_from={latest_checkpoint(trunk.run_dir / 'checkpoints')}"
    branch = train(_cfg(tmp_path, lang_files, "branch", "train.max_steps=8", *wsd, branch_from))
    assert branch.steps == whole.steps == 8
    assert branch.flops == whole.flops and branch.tokens == whole.tokens  # its true cost
    a, b = (load_file(latest_checkpoint(r.run_dir / "checkpoints") / "model.safetensors")
            for r in (whole, branch))  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)
    ours, theirs = _records(branch.run_dir), _records(whole.run_dir)
    assert sorted(ours) == [7, 8]  # the decay's own steps; the trunk's are in the trunk
    for step in (7, 8):
        assert ours[step]["loss"] == theirs[step]["loss"] and ours[step]["lr"] == theirs[step]["lr"]
    assert branch.valid_loss == whole.valid_loss
    trunk_records = _records(trunk.run_dir)
    assert all(trunk_records[s]["lr"] == theirs[s]["lr"] for s in range(1, 7))


def test_a_branch_that_changes_more_than_budget_and_schedule_is_refused(tmp_path, lang_files):
    trunk = train(_cfg(tmp_path, lang_files, "trunk", "train.max_steps=2",
                       "train.schedule=constant"))  # fmt: skip
    source = f"train.branch_from={trunk.run_dir}"
    with pytest.raises(ConfigError, match="cannot branch from .* a different train.lr"):
        train(_cfg(tmp_path, lang_files, "b", "train.max_steps=4", "train.lr=1e-4", source))
    with pytest.raises(ConfigError, match="exclude each other"):
        _cfg(tmp_path, lang_files, "c", source, f"train.init_from={trunk.run_dir}").validate()
