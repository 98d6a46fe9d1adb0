"""Controlling a run from outside: CPU threads, Ctrl-C, overwriting a run directory, dropping
optimizer states, and the experiment trackers (TensorBoard, Weights & Biases)."""

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_lab.config import ConfigError, load_config
from moe_lab.store.checkpoint import latest_checkpoint, list_checkpoints, load_run
from moe_lab.train.loop import train
from moe_lab.train.threads import auto_threads, busy_cores, cpu_threads
from tests.test_train import TINY, _cfg


def _steps(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def test_auto_threads_leave_busy_cores_and_share_among_processes():
    assert auto_threads(cores=2, busy=0) == 2
    assert auto_threads(cores=2, busy=1) == 1
    assert auto_threads(cores=2, busy=7) == 1  # never none
    assert auto_threads(cores=16, busy=0, processes=4) == 4
    assert auto_threads(cores=2, busy=0, processes=4) == 1


def test_a_spinning_process_counts_as_busy_and_threads_are_restored():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores() >= 1
    finally:
        spinner.kill()
        spinner.wait()
    before = torch.get_num_threads()
    with cpu_threads(1) as threads:
        assert threads == torch.get_num_threads() == 1
        with cpu_threads(None) as inner:  # compare's context holds: train's leaves it
            assert inner == 1
    assert torch.get_num_threads() == before


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint_and_resumes(tmp_path, lang_files):
    train_file, valid_file = lang_files
    run = tmp_path / "run"
    args = [sys.executable, "-m", "moe_lab", "train", *TINY, f"run.dir={run}", "run.threads=1",
            f"data.train_files=[{train_file}]", f"data.valid_files=[{valid_file}]",
            "train.max_steps=100000", "train.checkpoint_every=100000"]  # fmt: skip
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    stopped = _steps(run)[-1]
    assert f"stopped at step {stopped}, checkpoint written" in err and "run.resume=true" in err
    assert latest_checkpoint(run / "checkpoints").name == f"step-{stopped:08d}"
    cfg = load_config(run / "config.yaml", ["run.resume=true", f"train.max_steps={stopped + 2}"])
    result = train(cfg)
    assert result.steps == stopped + 2
    assert _steps(run) == list(range(1, stopped + 3))


def test_overwrite_replaces_a_finished_run(tmp_path, lang_files):
    train(_cfg(tmp_path, lang_files, "train.max_steps=2", "train.lr=1e-3"))
    with pytest.raises(ConfigError, match="run.overwrite=true to replace it"):
        train(_cfg(tmp_path, lang_files, "train.max_steps=3"))
    (tmp_path / "run" / "notes.txt").write_text("left by the old run")
    result = train(_cfg(tmp_path, lang_files, "train.max_steps=3", "run.overwrite=true"))
    assert result.steps == 3 and _steps(result.run_dir) == [1, 2, 3]
    assert load_config(result.run_dir / "config.yaml").train.lr == 3e-3
    assert not (result.run_dir / "notes.txt").exists()
    with pytest.raises(ConfigError, match="run.resume and run.overwrite"):
        _cfg(tmp_path, lang_files, "run.resume=true", "run.overwrite=true").validate()


def test_a_run_dir_that_is_a_file_is_refused_by_name(tmp_path, lang_files):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"run is a file, not a directory"):
        train(_cfg(tmp_path, lang_files, "train.max_steps=1"))


def test_a_finished_run_can_drop_its_optimizer_states(tmp_path, lang_files):
    extra = ("train.max_steps=4", "train.checkpoint_every=2", "train.keep_optimizer=false")
    result = train(_cfg(tmp_path, lang_files, *extra))
    checkpoints = list_checkpoints(result.run_dir / "checkpoints")
    assert [c.name for c in checkpoints] == ["step-00000002", "step-00000004"]
    for ckpt in checkpoints:
        assert not (ckpt / "optimizer.safetensors").exists()
        assert not (ckpt / "optimizer.json").exists()
        assert (ckpt / "model.safetensors").is_file()
    _, model, _ = load_run(result.run_dir)  # still evaluable, with the trained weights
    trained = load_file(checkpoints[-1] / "model.safetensors")
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    again = load_config(result.run_dir / "config.yaml", ["run.resume=true"])
    assert train(again).valid_loss == result.valid_loss  # nothing left to train: re-evaluated
    cfg = load_config(result.run_dir / "config.yaml", ["run.resume=true", "train.max_steps=6"])
    with pytest.raises(ConfigError, match="no optimizer state .*keep_optimizer=false"):
        train(cfg)


def _wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of the offline W&B run under ``run_dir``, read from its ``.wandb`` file:
    LevelDB-log framed records (7-byte headers in 32 KiB blocks), each a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, chunks, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({i.nested_key[0]: json.loads(i.value_json) for i in items})
    return rows


def test_weights_and_biases_logs_every_step_offline(tmp_path, lang_files, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(_cfg(tmp_path, lang_files, "train.max_steps=3", "train.wandb=true"))
    logged = {row["_step"]: row for row in _wandb_history(result.run_dir)}
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    for record in metrics:
        if "loss" in record:
            row = logged[record["step"]]
            assert row["loss"] == pytest.approx(record["loss"], rel=1e-12)
            assert row["lr"] == pytest.approx(record["lr"], rel=1e-12)
    assert sorted(logged) == [1, 2, 3]
    assert logged[3]["valid_loss"] == pytest.approx(result.valid_loss, rel=1e-12)
    run_id = (result.run_dir / "wandb-id").read_text()  # a resume continues this W&B run
    assert list(result.run_dir.glob(f"wandb/offline-run-*-{run_id}"))


def test_resume_refuses_training_data_changed_by_one_word(tmp_path, lang_files):
    """Same size, same block count, one word different: the tokens' fingerprint differs."""
    train_file, _ = lang_files
    train(_cfg(tmp_path, lang_files, "train.max_steps=2"))
    text = train_file.read_text()
    changed = text.replace('"the cat', '"the dog', 1)
    assert changed != text and len(changed) == len(text)
    train_file.write_text(changed)
    cfg = load_config(tmp_path / "run" / "config.yaml", ["run.resume=true", "train.max_steps=4"])
    with pytest.raises(ValueError, match="training data changed since the checkpoint .its tokens"):
        train(cfg)
