"""The training loop: one function, :func:`train`, that reads top to bottom.

AdamW (decay on matrices only), linear warmup then cosine to ``min_lr_ratio`` of the peak, gradient
clipping and accumulation, bf16 autocast on CUDA (fp32 on CPU), a budget in steps, tokens or
training FLOPs, ``metrics.jsonl`` every step, atomic checkpoints, and exact resume. The parts:
:mod:`~moe_lab.train.state` (what is checkpointed), :mod:`~moe_lab.train.step` (one optimizer
step), :mod:`~moe_lab.train.hooks` (what runs around it), :mod:`~moe_lab.train.run_dir`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_lab.budget import planned_steps
from moe_lab.config import Config, ConfigError, save_config
from moe_lab.eval.evaluate import evaluate
from moe_lab.store.checkpoint import drop_optimizer_states, write_json
from moe_lab.train.distributed import Dist
from moe_lab.train.distributed import setup as setup_distributed
from moe_lab.train.hooks import GlobalBatchLoads, RouterBias
from moe_lab.train.interrupt import GracefulInterrupt, TrainingInterrupted
from moe_lab.train.plots import plot_loss_curve
from moe_lab.train.run_dir import (
    RunLock,
    branch_checkpoint,
    prepare_run_dir,
    truncate_metrics,
)
from moe_lab.train.state import TrainData, TrainState, prepare_data
from moe_lab.train.step import NonFiniteError, train_step
from moe_lab.train.threads import cpu_threads
from moe_lab.train.trackers import check_trackers, open_trackers

__all__ = ["TrainResult", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    flops: float
    train_loss: float
    valid_loss: float
    skipped_steps: int
    wall_s: float  # seconds spent in training steps, summed over every resume


def train(cfg: Config, scope=None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` for the configured budget; see the module docstring.

    ``scope`` (a :class:`moe_lab.families.ifc.ExpertScope`) restricts which experts route and which
    train.
    """
    cfg.validate()
    dist = setup_distributed(cfg.parallel.dp, cfg.run.device)
    try:
        lock = RunLock(Path(cfg.run.dir)) if dist.is_main else contextlib.nullcontext()
        with lock, cpu_threads(cfg.run.threads):
            result = _train(cfg, scope, dist)
    except BaseException:
        dist.close(failed=True)
        raise
    dist.close()
    return result


def _train(cfg: Config, scope, dist: Dist) -> TrainResult:
    t, run_dir, main = cfg.train, Path(cfg.run.dir), dist.is_main
    device = _device(cfg.run.device, dist.local_rank)
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(cfg.run.seed)
    resume_from = prepare_run_dir(cfg)
    branched = resume_from is None and t.branch_from is not None  # a new branch of another run
    if branched:
        resume_from = branch_checkpoint(cfg)
    dist.barrier()  # every rank has checked the run directory before rank 0 writes to it
    total_steps = planned_steps(cfg, dist.world)
    # Data first: any problem with it is reported before the run directory is touched.
    data = prepare_data(cfg, dist.world, resume_from, branched)
    check_trackers(cfg)
    st = TrainState(cfg, dist, device, data.batches, scope)
    st.load_weights(resume_from)
    st.distribute()
    if (resume_from is None or branched) and main:
        _start_run_dir(cfg, data)
    dist.barrier()
    if resume_from is not None:
        st.resume(resume_from, total_steps)
    dist.barrier()
    trackers = open_trackers(cfg, run_dir) if main else []

    with open(run_dir / "metrics.jsonl", "a") if main else contextlib.nullcontext() as metrics:
        loss = _steps(st, data, total_steps, scope, metrics, trackers)
        result = _final_evaluation(st, data, metrics)
    for tracker in trackers:
        if result is not None:
            tracker.log({"valid_loss": result["overall"]["loss"]}, st.counters["step"])
        tracker.close()
    if main:
        plot_loss_curve(run_dir)
        if not t.keep_optimizer:
            drop_optimizer_states(run_dir / "checkpoints")
    result = dist.broadcast(result)
    c = st.counters
    skipped = c["skipped_nonfinite"] + c["skipped_spikes"]
    valid_loss = math.nan if result is None else result["overall"]["loss"]
    return TrainResult(
        run_dir, c["step"], c["tokens"], c["flops"], loss, valid_loss, skipped, c["wall_s"]
    )


def _steps(st: TrainState, data: TrainData, total_steps: int, scope, metrics, trackers) -> float:
    """Train from the current step to ``total_steps``, logging and checkpointing; return the last
    step's loss. Ctrl-C stops at the next step boundary, after a checkpoint."""
    t, dist, run_dir, main = st.cfg.train, st.dist, Path(st.cfg.run.dir), st.dist.is_main
    st.step_loss = torch.compile(st.step_loss) if t.compile else st.step_loss
    autocast = _autocast(st.device, t.precision)
    hooks = (scope, RouterBias.of(st.model, dist), GlobalBatchLoads.of(st.model))
    hooks = [h for h in hooks if h is not None]
    params = [p for p in st.model.parameters() if p.requires_grad]
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
    show = t.progress and main
    log_every = max(1, total_steps // 10) if show and not sys.stderr.isatty() else 0  # no bar
    bar = tqdm(total=total_steps, initial=st.counters["step"], desc="training", unit="step",
               disable=None if show else True)  # fmt: skip
    loss = float("nan")
    st.model.train()
    with GracefulInterrupt(enabled=dist.world == 1) as interrupt:
        while st.counters["step"] < total_steps:
            record = train_step(st, total_steps, autocast, hooks, params, clip)
            step, loss = record["step"], record["loss"]
            if t.eval_every and step % t.eval_every == 0 and step < total_steps:
                scored_model = st.evaluation_model()
                if main:
                    valid = evaluate(scored_model, data.valid, t.seq_len, t.eval_batch, st.device,
                                     t.eval_max_batches)  # fmt: skip
                    record["valid_loss"] = valid["overall"]["loss"]
            if main:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            for tracker in trackers:
                tracker.log(record, step)
            bar.update()
            if step % t.log_every == 0:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if log_every and step % log_every == 0:
                log.info("step %d of %d: loss %.4f", step, total_steps, loss)
            if step % t.checkpoint_every == 0 or step == total_steps or interrupt.requested:
                st.checkpoint()
            dist.barrier()  # a checkpoint is complete before any rank moves on
            if interrupt.requested and step < total_steps:
                bar.close()
                raise TrainingInterrupted(run_dir, step)
    bar.close()
    c = st.counters
    if c["step"] and c["skipped_nonfinite"] + c["skipped_spikes"] == c["step"]:
        raise NonFiniteError(
            f"every one of the {c['step']} steps was skipped (non-finite or spiking loss): "
            "nothing was learned; lower train.lr and rerun with run.overwrite=true"
        )
    return loss


def _final_evaluation(st: TrainState, data: TrainData, metrics) -> dict | None:
    """Rank 0 evaluates the final model on the validation documents (unless
    ``train.final_eval`` is false) and writes ``eval.json``, the record of a finished run."""
    t, c = st.cfg.train, st.counters
    scored_model = st.evaluation_model() if t.final_eval else None
    if not st.dist.is_main:
        return None
    summary = {"step": c["step"], "tokens": c["tokens"], "flops": c["flops"], "wall_s": c["wall_s"]}
    if st.peak_flops and c["wall_s"]:  # the devices' peak FLOP/s together, and the run's MFU
        summary |= {"peak_flops": st.peak_flops, "mfu": c["flops"] / c["wall_s"] / st.peak_flops}
    if not t.final_eval:
        write_json(Path(st.cfg.run.dir) / "eval.json", {**summary, "eval_s": 0.0, "valid": None})
        return None
    started = time.perf_counter()
    result = evaluate(
        scored_model, data.valid, t.seq_len, t.eval_batch, st.device, progress=t.progress
    )
    summary["eval_s"] = time.perf_counter() - started  # apart from wall_s, training's seconds
    summary["valid"] = result
    write_json(Path(st.cfg.run.dir) / "eval.json", summary)
    final = {"step": c["step"], "valid_loss": result["overall"]["loss"], "final": True}
    metrics.write(json.dumps(final) + "\n")
    return result


def _start_run_dir(cfg: Config, data: TrainData) -> None:
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    truncate_metrics(run_dir / "metrics.jsonl", 0)  # resume=true before any checkpoint
    save_config(cfg, run_dir / "config.yaml")
    data.tokenizer.save(run_dir / "tokenizer")


def _device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device is {spec!r} but CUDA is not available")
    return device


def _autocast(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
