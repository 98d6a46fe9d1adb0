"""No load path runs code planted in a checkpoint: DCP's pickled index is read with an allow-list
(moe_lab.store.sharded), and every other file the loaders read is safetensors, JSON or .npy."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lab.store.checkpoint import latest_checkpoint, load_run
from moe_lab.store.sharded import SafeReader, UnsafeCheckpointError
from tests.tiny import write_run


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(run: Path, marker: Path) -> Path:
    """Turn ``run``'s checkpoint into a 'sharded' one whose index is a pickle that runs code."""
    ckpt = latest_checkpoint(run / "checkpoints")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "checksums.json").unlink()  # whoever plants a file can drop the checksums too
    (ckpt / "sharded").mkdir()
    (ckpt / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return ckpt


def test_the_index_reader_refuses_a_payload(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"posix.system|os.system|not checkpoint"):
        SafeReader(tmp_path / "sharded").read_metadata()
    assert not marker.exists()


@pytest.mark.parametrize("how", ["python", "eval", "generate", "convert", "init_from"])
def test_no_command_runs_a_planted_checkpoint_index(tmp_path, how):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    write_run(run)
    ckpt = plant(run, marker)
    if how == "python":
        with pytest.raises(Exception, match="not checkpoint metadata"):
            load_run(run)
    else:
        argv = {
            "eval": ["eval", str(run)],
            "generate": ["generate", str(run), "--prompt", "a", "--max-new-tokens", "2"],
            "convert": ["convert", str(ckpt)],
            "init_from": [
                "train",
                f"train.init_from={ckpt}",
                f"run.dir={tmp_path / 'b'}",
                "train.max_steps=1",
            ],  # fmt: skip
        }[how]
        out = subprocess.run(
            [sys.executable, "-m", "moe_lab", *argv], capture_output=True, text=True
        )
        assert out.returncode != 0 and "not checkpoint metadata" in out.stderr, out.stderr[-1500:]
    assert not marker.exists()


def test_a_payload_stored_as_a_non_tensor_entry_is_refused(tmp_path):
    """DCP reads non-tensor entries with an unrestricted torch.load, and the index (here a genuine
    one, allowed classes only) says which entries those are: a weight can be one."""
    import torch
    import torch.distributed.checkpoint as dcp

    from moe_lab.store.sharded import safe_load

    marker = tmp_path / "ran"
    dcp.save({"model": {"w": Payload(marker)}}, checkpoint_id=tmp_path / "sharded", no_dist=True)
    template = {"model": {"w": torch.zeros(2)}}
    with pytest.raises(UnsafeCheckpointError, match="entry model.w is a pickle"):
        safe_load(template, tmp_path / "sharded", no_dist=True)
    assert not marker.exists()
    # Plain values (an optimizer's hyperparameters) still load.
    dcp.save({"optim": {"lr": 0.5, "betas": (0.9, 0.95)}}, checkpoint_id=tmp_path / "ok",
             no_dist=True)  # fmt: skip
    loaded = {"optim": {"lr": 0.0, "betas": (0.0, 0.0)}}
    safe_load(loaded, tmp_path / "ok", no_dist=True)
    assert loaded == {"optim": {"lr": 0.5, "betas": (0.9, 0.95)}}


def test_the_sharded_format_round_trips_values_and_refuses_a_tampered_index(tmp_path):
    """moe_lab's sharded format (store.sharded_format): tensors in safetensors, the optimizer's
    plain values in JSON, tuples kept; an index pointing outside its directory, or naming
    something other than a dtype, is refused."""
    import json

    import torch

    from moe_lab.store.sharded_format import INDEX, load_sharded, save_sharded

    group = {"lr": 0.1, "betas": (0.9, 0.95), "params": ["w"]}
    state = {"model": {"w": torch.randn(4, 3)}, "optim": {"param_groups": [group]}}
    save_sharded(state, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [INDEX, "rank0.safetensors"]
    empty = {"lr": 0.0, "betas": (0.0, 0.0), "params": ["x"]}
    template = {"model": {"w": torch.zeros(4, 3)}, "optim": {"param_groups": [empty]}}
    load_sharded(template, tmp_path / "s")
    assert torch.equal(template["model"]["w"], state["model"]["w"])
    assert template["optim"] == state["optim"]
    index = json.loads((tmp_path / "s" / INDEX).read_text())
    for tamper, message in [
        (
            lambda i: i["storage"][0].update(file="../elsewhere.safetensors"),
            "outside its directory",
        ),
        (lambda i: i["entries"]["model.w"].update(dtype="system"), "not a torch dtype"),
    ]:
        bad = json.loads(json.dumps(index))
        tamper(bad)
        (tmp_path / "s" / INDEX).write_text(json.dumps(bad))
        with pytest.raises(UnsafeCheckpointError, match=message):
            load_sharded(template, tmp_path / "s")
