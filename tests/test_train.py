import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moe_lab.store.checkpoint as checkpoint_module
import moe_lab.train.loop as train_module
import moe_lab.train.state as train_state
from moe_lab import build_model
from moe_lab.budget import planned_steps
from moe_lab.config import ConfigError, ModelConfig, load_config
from moe_lab.data.documents import DataError
from moe_lab.data.tokenizer import ByteTokenizer
from moe_lab.eval.evaluate import evaluate
from moe_lab.hardware import peak_flops
from moe_lab.nn.routing.topk import TopKRouter
from moe_lab.store.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from moe_lab.train.loop import train
from moe_lab.train.optim import SpikeDetector, lr_at
from moe_lab.train.run_dir import init_checkpoint, init_tokenizer_dir
from moe_lab.train.step import NonFiniteError

TINY = [
    "model.dim=32",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.ffn_hidden=64",
    "model.vocab_size=260",
    "train.seq_len=32",
    "train.batch_size=4",
    "train.eval_batch_size=32",
    "train.warmup_steps=2",
    "train.progress=false",
]


def _cfg(tmp_path, lang_files, *extra, name="run"):
    train_file, valid_file = lang_files
    return load_config(
        overrides=[
            *TINY,
            f"data.train_files=[{train_file}]",
            f"data.valid_files=[{valid_file}]",
            "data.group_fields=[lang]",
            f"run.dir={tmp_path / name}",
            *extra,
        ]
    )


def _losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _weights(run_dir):
    return load_file(latest_checkpoint(Path(run_dir) / "checkpoints") / "model.safetensors")


def test_loss_falls_on_the_shipped_corpus(tmp_path):
    cfg = load_config(
        overrides=[
            "train.max_steps=40",
            "train.lr=3e-3",
            "train.progress=false",
            "train.seq_len=64",
            f"run.dir={tmp_path / 'run'}",
        ]
    )
    result = train(cfg)
    losses = _losses(result.run_dir)
    assert losses[1] == pytest.approx(math.log(512), abs=0.1)  # uniform over the vocabulary
    assert sum(losses[s] for s in range(36, 41)) / 5 < 0.6 * losses[1]
    assert result.valid_loss < 0.65 * losses[1]
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "loss.png", "tokenizer"):
        assert (result.run_dir / name).exists(), name
    report = json.loads((result.run_dir / "eval.json").read_text())["valid"]
    assert len(report["groups"]["lang"]) >= 8 and len(report["groups"]["domain"]) >= 5


def _resume_in_fresh_process(run_dir, *overrides):
    cmd = [
        sys.executable,
        "-m",
        "moe_lab",
        "train",
        "--config",
        str(run_dir / "config.yaml"),
        f"run.dir={run_dir}",
        "run.resume=true",
        *overrides,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def _half_run(straight, copy):
    """A copy of a finished run as it stood at its middle checkpoint."""
    shutil.copytree(straight, copy)
    for ckpt in list_checkpoints(copy / "checkpoints")[1:]:
        shutil.rmtree(ckpt)
    step = int(latest_checkpoint(copy / "checkpoints").name[5:])
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text(
        "".join(
            ln + "\n" for ln in lines if json.loads(ln)["step"] <= step and "loss" in json.loads(ln)
        )
    )
    return step


def test_resume_in_a_fresh_process_is_bit_exact(tmp_path, lang_files):
    # Temperature sampling over languages draws from the data RNG every batch, so resuming
    # without the RNG state must diverge: that guards the test itself.
    cfg = _cfg(
        tmp_path,
        lang_files,
        "train.max_steps=8",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=5",
        "data.sample_by=lang",
        "data.sampling_alpha=0.3",
    )
    straight = train(cfg).run_dir
    expected, final = _losses(straight), _weights(straight)

    resumed = tmp_path / "resumed"
    assert _half_run(straight, resumed) == 4
    _resume_in_fresh_process(resumed)
    assert _losses(resumed) == expected  # floats compared exactly
    got = _weights(resumed)
    assert all(torch.equal(got[k], final[k]) for k in final)

    no_rng = tmp_path / "no_rng"
    _half_run(straight, no_rng)
    _resume_in_fresh_process(no_rng, "run.restore_rng=false")
    diverged = _losses(no_rng)
    assert all(diverged[s] == expected[s] for s in range(1, 5))
    assert any(diverged[s] != expected[s] for s in range(5, 9))


def test_resume_refuses_a_changed_config_and_fresh_runs_refuse_a_used_dir(tmp_path, lang_files):
    cfg = _cfg(tmp_path, lang_files, "train.max_steps=2")
    train(cfg)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)
    changed = _cfg(tmp_path, lang_files, "train.max_steps=2", "run.resume=true", "train.lr=1e-2")
    with pytest.raises(ConfigError, match=r"different train\.lr"):
        train(changed)
    longer = train(_cfg(tmp_path, lang_files, "train.max_steps=3", "run.resume=true"))
    assert longer.steps == 3 and sorted(_losses(longer.run_dir)) == [1, 2, 3]


def test_restart_before_any_checkpoint_and_a_torn_metrics_line(tmp_path, lang_files):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # killed
    train(_cfg(tmp_path, lang_files, "train.max_steps=2", "run.resume=true"))
    assert sorted(_losses(run)) == [1, 2] and _losses(run)[1] != 9.0  # stale lines replaced
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # torn again, after the last checkpoint
    result = train(_cfg(tmp_path, lang_files, "train.max_steps=3", "run.resume=true"))
    assert result.steps == 3 and sorted(_losses(run)) == [1, 2, 3]


def test_bad_data_leaves_no_run_directory(tmp_path, lang_files):
    cfg = _cfg(tmp_path, lang_files)
    cfg.data.train_files = [str(tmp_path / "missing.jsonl")]
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"train.seq_len \(512\) exceeds model.max_seq_len"):
        _cfg(tmp_path, lang_files, "train.seq_len=512")


# ---- checkpoints ---------------------------------------------------------------------------------


def _tiny_model_and_optimizer():
    model = build_model(ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=32, ffn_hidden=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 32, (2, 8))).logits.sum().backward()
    optimizer.step()
    return model, optimizer


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, optimizer = _tiny_model_and_optimizer()
    save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1, "note": "x"}, keep=2)
    expected_draw = torch.rand(3)
    other, other_opt = _tiny_model_and_optimizer()
    state = load_checkpoint(latest_checkpoint(tmp_path), other, other_opt)
    assert state["note"] == "x"
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored to the save point
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    a, b = optimizer.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(a[p]["exp_avg_sq"], b[p]["exp_avg_sq"]) for p in a)


def test_a_failed_write_leaves_the_previous_checkpoint_and_lists_no_partial(tmp_path, monkeypatch):
    model, optimizer = _tiny_model_and_optimizer()
    save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1}, keep=3)
    real_save = checkpoint_module.save_file

    def dies_on_optimizer(tensors, path):
        if Path(path).name == "optimizer.safetensors":
            Path(path).write_bytes(b"half")
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", dies_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, optimizer, {"step": 2}, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # no temp left
    (tmp_path / "step-00000003").mkdir()  # a crash after mkdir, before the marker
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert load_checkpoint(latest_checkpoint(tmp_path), model, optimizer)["step"] == 1


def test_keep_last_k(tmp_path):
    model, optimizer = _tiny_model_and_optimizer()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, optimizer, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]


# ---- non-finite losses and spikes ----------------------------------------------------------------


def _nan_at_step(monkeypatch, bad_step, seen_models):
    """Build models whose loss turns NaN on the ``bad_step``-th call."""

    def recording_build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        calls, real_loss = {"n": 0}, model.loss

        def loss(*a, **k):
            calls["n"] += 1
            value, *rest = real_loss(*a, **k)
            return (value * float("nan"), *rest) if calls["n"] == bad_step else (value, *rest)

        model.loss = loss
        seen_models.append(model)
        return model

    monkeypatch.setattr(train_state, "build_model", recording_build)


def test_nan_loss_stops_before_the_optimizer_step(tmp_path, lang_files, monkeypatch):
    models = []
    _nan_at_step(monkeypatch, 3, models)
    cfg = _cfg(
        tmp_path,
        lang_files,
        "train.max_steps=5",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=5",
    )
    with pytest.raises(NonFiniteError, match=r"step 3: loss nan .* parameters unchanged"):
        train(cfg)
    after_step_2 = _weights(tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000002"
    assert all(torch.equal(v.cpu(), after_step_2[k]) for k, v in models[0].state_dict().items())


def test_nan_loss_with_skip_skips_and_counts(tmp_path, lang_files, monkeypatch):
    _nan_at_step(monkeypatch, 3, [])
    cfg = _cfg(
        tmp_path,
        lang_files,
        "train.max_steps=4",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=5",
        "train.on_nonfinite=skip",
    )
    result = train(cfg)
    assert result.steps == 4 and result.skipped_steps == 1
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if "loss" in r] == [False, False, True, False]
    ckpts = list_checkpoints(result.run_dir / "checkpoints")
    w2, w3 = (load_file(c / "model.safetensors") for c in ckpts[1:3])
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert json.loads((ckpts[-1] / "state.json").read_text())["skipped_nonfinite"] == 1


def test_a_skipped_step_leaves_no_load_for_the_next_bias_update(tmp_path, lang_files, monkeypatch):
    _nan_at_step(monkeypatch, 3, [])
    loads, real = [], TopKRouter.update_bias
    monkeypatch.setattr(
        TopKRouter,
        "update_bias",
        lambda r: loads.append(r.tokens_per_expert.sum().item()) or real(r),
    )
    moe = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32"]
    cfg = _cfg(
        tmp_path,
        lang_files,
        *moe,
        "model.moe.bias_update_rate=0.01",
        "train.max_steps=4",
        "train.on_nonfinite=skip",
    )
    train(cfg)
    per_step = cfg.train.batch_size * cfg.train.seq_len * 2  # every token's 2 assignments
    assert len(loads) == 3 * cfg.model.n_layers and set(loads) == {per_step}


def test_branching_from_a_sharded_checkpoint_keeps_its_runs_tokenizer(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    (checkpoint / "sharded").mkdir(parents=True)  # FSDP2's: no model.safetensors
    (checkpoint / "COMPLETE").touch()
    ByteTokenizer().save(tmp_path / "run" / "tokenizer")
    assert init_tokenizer_dir(checkpoint) == tmp_path / "run" / "tokenizer"
    assert init_tokenizer_dir(tmp_path / "run") == tmp_path / "run" / "tokenizer"


def test_spike_detector_flags_outliers_after_half_a_window():
    det = SpikeDetector(window=4, sigma=1.0)
    assert not det.is_spike(1e9)  # too little history to judge
    det = SpikeDetector(window=4, sigma=1.0)
    for loss in (2.0, 2.1):
        assert not det.is_spike(loss)
    assert det.is_spike(1e9)
    assert not det.is_spike(2.05)
    restored = SpikeDetector(window=4, sigma=1.0)
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert list(restored.history) == [2.0, 2.1, 2.05]


# ---- schedule and budget -------------------------------------------------------------------------


def test_lr_schedule_closed_form():
    assert lr_at(1, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_at(10, 1.0, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110, 0.1) == pytest.approx(0.55)  # half-way: 0.1 + 0.9 * 0.5
    assert lr_at(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_at(5, 2.0, 0, 5, 0.0) == pytest.approx(0.0)


def test_budget_in_tokens_and_flops():
    base = ["train.batch_size=4", "train.grad_accum=2", "train.seq_len=64"]
    assert planned_steps(load_config(overrides=[*base, "train.max_tokens=5120"])) == 10
    cfg = load_config(overrides=base)
    from moe_lab.accounting import estimate

    per_step = 512 * estimate(cfg.model, 64).train_flops_per_token
    cfg.train.max_flops = 7.5 * per_step
    assert planned_steps(cfg) == 7
    cfg.train.max_flops = 0.5 * per_step
    with pytest.raises(ConfigError, match="less than one step"):
        planned_steps(cfg)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, lang_files):
    fp32 = "run.device=cpu"  # equal to float rounding: not under CUDA's bf16 autocast
    big = train(
        _cfg(
            tmp_path,
            lang_files,
            fp32,
            "train.max_steps=2",
            "train.batch_size=8",
            "train.grad_clip=0",
            name="big",
        )
    )
    small = train(
        _cfg(
            tmp_path,
            lang_files,
            fp32,
            "train.max_steps=2",
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.grad_clip=0",
            name="accum",
        )
    )
    for step, loss in _losses(big.run_dir).items():
        assert _losses(small.run_dir)[step] == pytest.approx(loss, rel=1e-6)
    a, b = _weights(big.run_dir), _weights(small.run_dir)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)


def test_tensorboard_logs_when_enabled(tmp_path, lang_files):
    pytest.importorskip("tensorboard")
    result = train(_cfg(tmp_path, lang_files, "train.max_steps=2", "train.tensorboard=true"))
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_evaluations_run_in_batches_of_eval_batch_size(tmp_path, lang_files, monkeypatch):
    sizes = []

    def recording_evaluate(model, store, seq_len, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        return evaluate(model, store, seq_len, batch_size, *args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", recording_evaluate)
    extra = ("train.max_steps=2", "train.eval_every=1", "train.eval_batch_size=7")
    train(_cfg(tmp_path, lang_files, *extra))
    assert sizes == [7, 7]  # after step 1 (the periodic one) and at the end


def test_a_sharded_checkpoint_loads_converts_and_initialises_in_one_process(tmp_path, lang_files):
    """The DCP form FSDP2 runs write (here by a single process) is read without a process group."""
    from moe_lab.config import save_config
    from moe_lab.store.checkpoint import SHARDED, convert_checkpoint, staging_dir
    from moe_lab.train.distributed import Dist

    cfg = _cfg(tmp_path, lang_files)
    run = Path(cfg.run.dir)
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    staged = staging_dir(run / "checkpoints", 1, create=True)
    Dist().save_sharded(staged / SHARDED, model, optimizer)
    save_checkpoint(run / "checkpoints", 1, None, None, {"step": 1}, keep=1, staged=True)
    ckpt = latest_checkpoint(run / "checkpoints")
    assert not (ckpt / "model.safetensors").exists()
    # train.init_from may name the checkpoint itself or its run
    assert init_checkpoint(ckpt) == init_checkpoint(run) == ckpt
    other = build_model(cfg.model)
    load_checkpoint(ckpt, other, restore_rng_state=False)
    converted = load_file(convert_checkpoint(run))
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v) and torch.equal(converted[k], v), k


def test_training_time_and_mfu_add_up_over_a_resume(tmp_path, lang_files):
    peak = 1e11  # train.peak_flops: how a CPU run (or an unlisted GPU) gets an MFU
    cfg = _cfg(tmp_path, lang_files, "train.max_steps=4", "train.checkpoint_every=2",
               f"train.peak_flops={peak}")  # fmt: skip
    first = train(cfg)
    resumed = train(
        load_config(tmp_path / "run" / "config.yaml", ["run.resume=true", "train.max_steps=6"])
    )
    records = [
        r
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    tokens = 4 * 32  # batch_size x seq_len of every step
    summed = sum(tokens / r["tokens_per_s"] for r in records)  # each step's own seconds
    assert resumed.wall_s == pytest.approx(summed, rel=1e-9) and resumed.wall_s > first.wall_s
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert summary["wall_s"] == resumed.wall_s
    per_token = cfg.model.flops_per_token(cfg.train.seq_len)
    for r in records:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / peak, rel=1e-9)
    assert summary["mfu"] == pytest.approx(summary["flops"] / summary["wall_s"] / peak, rel=1e-12)


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.4e12),
     ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
     ("NVIDIA L4", 121e12), ("NVIDIA GeForce GTX 1080", None)],
)  # fmt: skip
def test_the_bf16_peak_of_a_gpu_is_looked_up_by_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda")) == peak
    assert peak_flops(torch.device("cuda"), override=5e12) == 5e12
    assert peak_flops(torch.device("cpu")) is None


def test_a_run_whose_every_step_is_skipped_fails(tmp_path, lang_files, monkeypatch):
    def nan_build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        real_loss = model.loss
        model.loss = lambda *a, **k: (lambda v, *rest: (v * float("nan"), *rest))(
            *real_loss(*a, **k)
        )
        return model

    monkeypatch.setattr(train_state, "build_model", nan_build)
    cfg = _cfg(tmp_path, lang_files, "train.max_steps=3", "train.on_nonfinite=skip")
    with pytest.raises(NonFiniteError, match="every one of the 3 steps was skipped"):
        train(cfg)
    assert not (tmp_path / "run" / "eval.json").exists()  # no loss NaN written as a result


@pytest.mark.parametrize(
    "override",
    ["train.lr=inf", "train.lr=1e6", "train.eps=inf", "model.rope_theta=inf",
     "train.weight_decay=nan", "train.grad_clip=inf", "train.peak_flops=0"],
)  # fmt: skip
def test_non_finite_and_absurd_settings_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(overrides=[override])


def test_a_damaged_json_file_is_an_error_that_names_it(tmp_path):
    from moe_lab.store.checkpoint import read_json, write_json

    path = tmp_path / "eval.json"
    write_json(path, {"step": 4, "valid": {"overall": {"loss": 2.0}}})
    assert read_json(path)["step"] == 4
    path.write_text(path.read_text()[:20])  # cut short
    with pytest.raises(ValueError, match=r"eval.json is not valid JSON .* cut short"):
        read_json(path)
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        read_json(tmp_path / "missing.json")


def test_one_writer_per_run_directory_with_real_processes(tmp_path, lang_files):
    """A second `moe-lab train` on a run directory in use is refused, naming the holder; once
    the holder dies its lock is taken over."""
    import os
    import signal
    import subprocess
    import sys
    import time

    train_file, valid_file = lang_files
    args = [sys.executable, "-m", "moe_lab", "train", *TINY, f"run.dir={tmp_path / 'run'}",
            f"data.train_files=[{train_file}]", f"data.valid_files=[{valid_file}]",
            "run.resume=true"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*args, "train.max_steps=100000"], env=env, stderr=subprocess.PIPE)
    try:
        for _ in range(600):  # the first run holds the lock once it has written a step
            if (tmp_path / "run" / "metrics.jsonl").is_file():
                break
            time.sleep(0.1)
        second = subprocess.run([*args, "train.max_steps=2"], env=env, capture_output=True,
                                text=True)  # fmt: skip
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by process {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = subprocess.run([*args, "train.max_steps=2"], env=env, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-2000:]  # the dead process's lock is taken over
