"""The training loop: one function, :func:`train`, that reads top to bottom.

AdamW (decay on matrices only), linear warmup then cosine to ``min_lr_ratio`` of the peak, gradient
clipping and accumulation, bf16 autocast on CUDA (fp32 on CPU), a budget in steps, tokens or
training FLOPs, ``metrics.jsonl`` every step, atomic checkpoints, and exact resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from moe_lab.accounting import estimate
from moe_lab.checkpoint import (
    MARKER,
    SHARDED,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_optimizer_state,
    read_training_state,
    save_checkpoint,
    staging_dir,
)
from moe_lab.config import Config, ConfigError, load_config, save_config
from moe_lab.data import build_tokenizer, load_splits
from moe_lab.distributed import Dist
from moe_lab.distributed import setup as setup_distributed
from moe_lab.evaluate import evaluate
from moe_lab.metrics import read_metrics
from moe_lab.model import build_model
from moe_lab.packing import IGNORE, TrainBatches, build_store, cache_root
from moe_lab.routing import RouterStats, TopKRouter, load_balancing_loss
from moe_lab.tokenizer import load_tokenizer
from moe_lab.weights import load_weights

__all__ = ["NonFiniteError", "SpikeDetector", "TrainResult", "lr_at", "planned_steps", "train"]

log = logging.getLogger(__name__)

# Keys that may differ between a run and its resumption; any other change is refused, because a
# checkpoint's optimizer state would silently override it (the OPT-175B logbook's betas lesson).
RESUMABLE_KEYS = {
    "train.max_steps",
    "train.max_tokens",
    "train.max_flops",
    "train.log_every",
    "train.eval_every",
    "train.eval_max_batches",
    "train.eval_batch_size",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.progress",
    "train.tensorboard",
    "train.on_nonfinite",
    "train.spike_action",
    "train.compile",
    "run.dir",
    "run.resume",
    "run.restore_rng",
    "run.device",
    "data.cache_dir",
}


BUDGET_KEYS = ("max_steps", "max_tokens", "max_flops")


class NonFiniteError(RuntimeError):
    """The loss or gradient norm is NaN or infinite; raised before the optimizer step."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    flops: float
    train_loss: float
    valid_loss: float
    skipped_steps: int


class SpikeDetector:
    """Flags a loss above ``mean + sigma * std`` of the last ``window`` accepted losses.

    Inactive until half the window is filled (OLMo-core's SkipStepOptimizer rule); flagged losses
    are not added to the window, so one spike does not mask the next.
    """

    def __init__(self, window: int, sigma: float) -> None:
        self.sigma = sigma
        self.history: deque[float] = deque(maxlen=window)

    def is_spike(self, loss: float) -> bool:
        if len(self.history) >= max(2, self.history.maxlen // 2):
            values = np.array(self.history)
            if loss > values.mean() + self.sigma * values.std():
                return True
        self.history.append(loss)
        return False

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine decay."""
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def planned_steps(cfg: Config, world: int = 1) -> int:
    """Optimizer steps of a run over ``world`` data-parallel ranks: its budget in FLOPs, tokens or
    steps (first set wins)."""
    t = cfg.train
    tokens_per_step = t.batch_size * world * t.grad_accum * t.seq_len
    if t.max_flops is not None:
        per_step = tokens_per_step * estimate(cfg.model, t.seq_len).train_flops_per_token
        steps = int(t.max_flops // per_step)
        if steps == 0:
            raise ConfigError(
                f"train.max_flops ({t.max_flops:.3g}) is less than one step ({per_step:.3g} FLOPs)"
            )
        return steps
    if t.max_tokens is not None:
        if t.max_tokens < tokens_per_step:
            raise ConfigError(
                f"train.max_tokens ({t.max_tokens}) is less than one step ({tokens_per_step})"
            )
        return t.max_tokens // tokens_per_step
    return t.max_steps


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


def _optimizer(
    model: torch.nn.Module,
    cfg: Config,
    scope=None,
    fused: bool = True,
    mixed_dtensors: bool = False,
) -> torch.optim.AdamW:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    groups = scope.param_groups(t.weight_decay) if scope is not None else None
    groups = groups or [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # norms
    ]
    # The fused kernel updates all parameters in one pass: 4x faster than the default on a 2-core
    # CPU for a 7M-parameter model (bench/train_step.py), and available on CPU and CUDA (not for
    # FSDP2's sharded DTensor parameters).
    fused = fused and all(p.device.type in ("cpu", "cuda") for p in params)
    # FSDP2 with expert parallelism mixes DTensor and rank-local parameters, which the multi-tensor
    # (foreach) kernels refuse in one list: one tensor at a time there.
    foreach = False if mixed_dtensors else None
    return torch.optim.AdamW(
        groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused, foreach=foreach
    )


def _routing_record(stats: list[RouterStats], cfg: Config) -> list[dict[str, float]]:
    """Per MoE layer: load (min, max, coefficient of variation), drops, entropy, losses."""
    moe_layers = [i for i in range(cfg.model.n_layers) if cfg.model.moe.is_moe_layer(i)]
    records = []
    for layer, s in zip(moe_layers, stats, strict=True):
        load = s.slot_counts_KE.sum(dim=0)
        records.append(
            {
                "layer": layer,
                "tokens_min": load.min().item(),
                "tokens_max": load.max().item(),
                "tokens_cv": (load.std(unbiased=False) / load.mean()).item(),
                "dropped": s.dropped.item(),
                "entropy": s.entropy.item(),
                "lbl": load_balancing_loss([s], cfg.model.moe.lbl).item(),
                "z_loss": s.lse_sq.item(),
            }
        )
    return records


def _flat(cfg: Config) -> dict[str, object]:
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    flat: dict[str, object] = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            flat[prefix] = node

    walk(container, "")
    return flat


def _prepare_run_dir(cfg: Config) -> Path | None:
    """Check the run directory; return the checkpoint to resume from, if any."""
    run_dir = Path(cfg.run.dir)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if not cfg.run.resume:
        if (run_dir / "metrics.jsonl").exists() or ckpt is not None:
            raise ConfigError(
                f"run.dir {run_dir} already holds a run; set run.resume=true to continue it "
                "or choose another run.dir"
            )
        return None
    if ckpt is None:
        return None
    old, new = _flat(load_config(run_dir / "config.yaml")), _flat(cfg)
    changed = sorted(k for k, v in new.items() if old.get(k) != v and k not in RESUMABLE_KEYS)
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir} with a different {', '.join(changed)}; only "
            f"{', '.join(sorted(RESUMABLE_KEYS))} may change"
        )
    if any(old.get(f"train.{b}") != new[f"train.{b}"] for b in BUDGET_KEYS):
        log.warning(
            "the budget changed on resume: the cosine schedule is re-stretched to the "
            "new length, so the run no longer matches an uninterrupted one"
        )
    return ckpt


def _init_checkpoint(path: Path) -> Path:
    """The checkpoint ``train.init_from`` names: a checkpoint directory or a run's latest one."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise ConfigError(
            f"train.init_from ({path}) is neither a checkpoint nor a run directory "
            "with a complete checkpoint"
        )
    return ckpt


def _init_tokenizer_dir(path: Path) -> Path | None:
    """The tokenizer saved with the run that ``train.init_from`` names, if any."""
    run = path.parent.parent if (path / MARKER).is_file() else path  # a checkpoint
    return run / "tokenizer" if (run / "tokenizer").is_dir() else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric records up to ``step``: later ones (and a torn last line) belong to the
    interrupted attempt that the resumed run repeats."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def train(cfg: Config, scope=None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` for the configured budget; see the module docstring.

    ``scope`` (a :class:`moe_lab.ifc.ExpertScope`) restricts which experts route and which train.
    """
    cfg.validate()
    dist = setup_distributed(cfg.parallel.dp, cfg.run.device)
    try:
        result = _train(cfg, scope, dist)
    except BaseException:
        dist.close(failed=True)
        raise
    dist.close()
    return result


def _train(cfg: Config, scope, dist: Dist) -> TrainResult:
    t = cfg.train
    device = _device(cfg.run.device, dist.local_rank)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    run_dir = Path(cfg.run.dir)
    resume_from = _prepare_run_dir(cfg)
    dist.barrier()  # every rank has checked the run directory before rank 0 writes to it
    total_steps = planned_steps(cfg, dist.world)

    # Data first: any problem with it is reported before the run directory is touched.
    train_docs, valid_docs, groups = load_splits(cfg)
    if resume_from is not None:
        tokenizer = load_tokenizer(run_dir / "tokenizer")
    elif t.init_from is not None and (init_tokenizer := _init_tokenizer_dir(Path(t.init_from))):
        # The weights are tied to their run's token ids: a branched run keeps that tokenizer.
        tokenizer = load_tokenizer(init_tokenizer)
    else:
        tokenizer = build_tokenizer(cfg, train_docs)
    cache = cache_root(cfg.data.cache_dir)
    text = cfg.data.text_field
    train_store = build_store(train_docs, tokenizer, text, groups, cache, cfg.data.sample_by)
    valid_store = build_store(valid_docs, tokenizer, text, groups, cache)
    batches = TrainBatches(  # the global batch; each rank trains on its slice
        train_store,
        t.seq_len,
        t.batch_size * dist.world,
        cfg.run.seed,
        cfg.data.sample_by,
        cfg.data.sampling_alpha,
    )
    if t.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("train.tensorboard needs tensorboard: pip install tensorboard") from e

    model = build_model(cfg.model, device=device)
    if scope is not None:
        if dist.mode == "fsdp2" or cfg.parallel.ep:
            raise ConfigError("expert scopes (moe_lab.ifc) need parallel.dp=none or ddp, no ep")
        scope.apply(model)
    if resume_from is None and t.init_from is not None:  # weights only, before any sharding
        source = _init_checkpoint(Path(t.init_from))
        load_checkpoint(source, model, restore_rng_state=False)
        log.info("initialised from %s", source)
    if resume_from is not None and dist.mode != "fsdp2":  # full weights, before any sharding
        load_checkpoint(resume_from, model, restore_rng_state=False)
    if cfg.parallel.ep:
        dist.shard_experts(model, cfg.parallel.ep_degree)
    step_loss = dist.wrap(model, device)  # FSDP2 shards the parameters: before the optimizer
    fsdp2 = dist.mode == "fsdp2"
    optimizer = _optimizer(
        model, cfg, scope, fused=not fsdp2, mixed_dtensors=fsdp2 and cfg.parallel.ep
    )
    detector = SpikeDetector(t.spike_window, t.spike_sigma)
    state = {"step": 0, "tokens": 0, "flops": 0.0, "skipped_nonfinite": 0, "skipped_spikes": 0}
    if resume_from is not None:
        saved = read_training_state(resume_from, cfg.run.restore_rng)
        if (saved_world := saved.get("world", dist.world)) != dist.world:
            raise ConfigError(
                f"{resume_from} was saved by {saved_world} processes and this run has "
                f"{dist.world}: the global batch (train.batch_size per process) and the data "
                "order would change; resume with as many processes, or start a new run.dir"
            )
        if dist.mode == "fsdp2":
            dist.load_sharded(resume_from / SHARDED, model, optimizer)
        else:
            full = read_optimizer_state(resume_from)
            optimizer.load_state_dict(dist.local_optimizer_state(full, optimizer))
        state = {k: saved[k] for k in state}
        batches.load_state_dict(saved["data"], restore_rng=cfg.run.restore_rng)
        detector.load_state_dict(saved["spike"])
        if dist.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", state["step"])
        log.info("resumed %s at step %d", resume_from, state["step"])
    elif dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(run_dir / "metrics.jsonl", 0)  # resume=true before any checkpoint
        save_config(cfg, run_dir / "config.yaml")
        tokenizer.save(run_dir / "tokenizer")
    dist.barrier()
    main = dist.is_main  # rank 0 alone writes metrics, checkpoints and evaluations
    writer = SummaryWriter(str(run_dir / "tensorboard")) if t.tensorboard and main else None

    flops_per_token = estimate(cfg.model, t.seq_len).train_flops_per_token
    step_loss = torch.compile(step_loss) if t.compile else step_loss
    autocast = _autocast(device, t.precision)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
    biased_routers = [
        m for m in model.modules() if isinstance(m, TopKRouter) and m.cfg.bias_update_rate > 0
    ]

    def checkpoint():
        """Every rank calls this (sharded state is written or gathered collectively); rank 0
        writes the rest and commits the checkpoint."""
        directory = run_dir / "checkpoints"
        extra = {
            **state,
            "world": dist.world,
            "data": batches.state_dict(),
            "spike": detector.state_dict(),
        }
        if dist.mode == "fsdp2":  # each rank writes its shards; nothing is gathered
            staged = staging_dir(directory, state["step"], create=main)
            dist.barrier()
            dist.save_sharded(staged / SHARDED, model, optimizer)
            dist.barrier()
            if main:
                save_checkpoint(
                    directory, state["step"], None, None, extra, t.keep_checkpoints, staged=True
                )
            return
        weights = dist.full_state_dict(model)
        moments = dist.full_optimizer_state(optimizer)
        if main:
            save_checkpoint(
                directory, state["step"], model, moments, extra, t.keep_checkpoints, weights
            )

    def evaluation_model():
        """The model rank 0 evaluates (an unsharded copy if sharded); call on every rank."""
        weights = dist.full_state_dict(model)
        if weights is None:
            return model
        if not main:
            return None
        # Building draws from rank 0's generator only: a resumed run, which restores one state
        # on every rank, would then draw different jitter on the other ranks.
        on_gpu = [device] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=on_gpu):
            copy = build_model(cfg.model, device=device)
        load_weights(copy, {k: v.to(device) for k, v in weights.items()})
        return copy

    metrics = open(run_dir / "metrics.jsonl", "a") if main else None
    bar = tqdm(
        total=total_steps,
        initial=state["step"],
        desc="training",
        unit="step",
        disable=None if t.progress and main else True,
    )
    loss_value = float("nan")
    model.train()
    while state["step"] < total_steps:
        started = time.perf_counter()
        step = state["step"] + 1
        lr = lr_at(step, t.lr, t.warmup_steps, total_steps, t.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, aux_sum = 0.0, 0.0
        micro = [dist.shard(batches.next_batch(t.doc_masking)) for _ in range(t.grad_accum)]
        # Each micro-batch's mean loss is weighted by its share of the scored tokens of the whole
        # step (all micro-batches, all ranks), so that accumulation and data parallelism equal one
        # batch of batch_size * grad_accum * world sequences. DDP averages gradients over ranks:
        # the factor `world` turns that average back into this sum.
        scored = [(b["targets"] != IGNORE).sum().item() for b in micro]
        total_scored = max(dist.sum(sum(scored)), 1)
        for batch, n in zip(micro, scored, strict=True):
            share = n / total_scored
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                loss, aux, routing = step_loss(
                    batch["input_ids"], batch["targets"], batch.get("doc_ids")
                )
            (loss * share * dist.world + aux / t.grad_accum).backward()
            loss_sum += loss.item() * share
            aux_sum += aux.item() / t.grad_accum
        grad_norm = dist.clip_grad_norm_(params, clip)
        loss_value = dist.sum(loss_sum)
        aux_sum = dist.sum(aux_sum) / dist.world
        skipped = spike = False
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            if t.on_nonfinite == "raise":
                if metrics is not None:
                    metrics.close()
                raise NonFiniteError(
                    f"step {step}: loss {loss_value} or grad norm {grad_norm} is not finite; "
                    "stopped before the optimizer step, parameters unchanged "
                    "(train.on_nonfinite=skip skips such steps)"
                )
            skipped, state["skipped_nonfinite"] = True, state["skipped_nonfinite"] + 1
        elif t.spike_action != "none" and detector.is_spike(loss_value):
            spike = True
            log.warning("step %d: loss spike %.4f", step, loss_value)
            if t.spike_action == "skip":
                skipped, state["skipped_spikes"] = True, state["skipped_spikes"] + 1
        if not skipped:
            if scope is not None:
                scope.before_step(lr)
            optimizer.step()
            for router in biased_routers:  # aux-loss-free balancing follows the global load
                dist.sum_(router.tokens_per_expert)
                router.update_bias()
        else:  # a rejected batch's load must not steer the next bias update
            for router in biased_routers:
                router.tokens_per_expert.zero_()
        optimizer.zero_grad(set_to_none=True)

        tokens = t.batch_size * dist.world * t.grad_accum * t.seq_len
        state.update(
            step=step,
            tokens=state["tokens"] + tokens,
            flops=state["flops"] + tokens * flops_per_token,
        )
        elapsed = time.perf_counter() - started
        record = {
            "step": step,
            "loss": loss_value,
            "aux_loss": aux_sum,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": state["tokens"],
            "flops": state["flops"],
            "tokens_per_s": tokens / elapsed,
            "skipped": skipped,
            "spike": spike,
        }
        if routing:
            record["routing"] = _routing_record(routing, cfg)
        if t.eval_every and step % t.eval_every == 0 and step < total_steps:
            scored_model = evaluation_model()
            if main:
                record["valid_loss"] = evaluate(
                    scored_model, valid_store, t.seq_len, t.eval_batch, device, t.eval_max_batches
                )["overall"]["loss"]
        if main:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if writer is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "valid_loss"):
                if key in record:
                    writer.add_scalar(key, record[key], step)
        bar.update()
        if step % t.log_every == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if step % t.checkpoint_every == 0 or step == total_steps:
            checkpoint()
        dist.barrier()  # a checkpoint is complete before any rank moves on
    bar.close()

    result = None
    scored_model = evaluation_model()
    if main:
        result = evaluate(
            scored_model, valid_store, t.seq_len, t.eval_batch, device, progress=t.progress
        )
        summary = {
            "step": state["step"],
            "tokens": state["tokens"],
            "flops": state["flops"],
            "valid": result,
        }
        (run_dir / "eval.json").write_text(json.dumps(summary, indent=2))
        final = {"step": state["step"], "valid_loss": result["overall"]["loss"], "final": True}
        metrics.write(json.dumps(final) + "\n")
        metrics.close()
        if writer is not None:
            writer.close()
        from moe_lab.plots import plot_loss_curve

        plot_loss_curve(run_dir)
    result = dist.broadcast(result)
    return TrainResult(
        run_dir,
        state["step"],
        state["tokens"],
        state["flops"],
        loss_value,
        result["overall"]["loss"],
        state["skipped_nonfinite"] + state["skipped_spikes"],
    )
