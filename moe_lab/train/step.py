"""One optimizer step: micro-batches forward and backward, clipping, the non-finite and spike
checks, the hooks around ``optimizer.step()``, and the step's metrics record."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

from moe_lab.config import Config
from moe_lab.data.packing import IGNORE
from moe_lab.nn.routing import RouterStats, load_balancing_loss
from moe_lab.train.hooks import StepHook
from moe_lab.train.optim import lr_at
from moe_lab.train.state import TrainState

__all__ = ["NonFiniteError", "routing_record", "train_step"]

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or gradient norm is NaN or infinite; raised before the optimizer step."""


def _forward_backward(st: TrainState, autocast) -> tuple[float, float, list]:
    """Accumulate the gradients of one global batch; return its loss, aux loss and routing."""
    t, dist = st.cfg.train, st.dist
    loss_sum, aux_sum, routing = 0.0, 0.0, []
    micro = [dist.shard(st.batches.next_batch(t.doc_masking)) for _ in range(t.grad_accum)]
    # Each micro-batch's mean loss is weighted by its share of the scored tokens of the whole
    # step (all micro-batches, all ranks), so that accumulation and data parallelism equal one
    # batch of batch_size * grad_accum * world sequences. DDP averages gradients over ranks:
    # the factor `world` turns that average back into this sum.
    scored = [(b["targets"] != IGNORE).sum().item() for b in micro]
    total_scored = max(dist.sum(sum(scored)), 1)
    for batch, n in zip(micro, scored, strict=True):
        share = n / total_scored
        batch = {k: v.to(st.device) for k, v in batch.items()}
        with autocast:
            loss, aux, routing = st.step_loss(
                batch["input_ids"], batch["targets"], batch.get("doc_ids")
            )
        (loss * share * dist.world + aux / t.grad_accum).backward()
        loss_sum += loss.item() * share
        aux_sum += aux.item() / t.grad_accum
    return dist.sum(loss_sum), dist.sum(aux_sum) / dist.world, routing


def _rejected(st: TrainState, step: int, loss: float, grad_norm: float) -> tuple[bool, bool]:
    """(skip the optimizer step, the loss is a spike), per ``train.on_nonfinite`` and
    ``train.spike_action``; raises :class:`NonFiniteError` when told to."""
    t, c = st.cfg.train, st.counters
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        if t.on_nonfinite == "raise":
            raise NonFiniteError(
                f"step {step}: loss {loss} or grad norm {grad_norm} is not finite; "
                "stopped before the optimizer step, parameters unchanged "
                "(train.on_nonfinite=skip skips such steps)"
            )
        c["skipped_nonfinite"] += 1
        return True, False
    if t.spike_action != "none" and st.detector.is_spike(loss):
        log.warning("step %d: loss spike %.4f", step, loss)
        if t.spike_action == "skip":
            c["skipped_spikes"] += 1
            return True, True
        return False, True
    return False, False


def train_step(
    st: TrainState, total_steps: int, autocast, hooks: Sequence[StepHook], params, clip: float
) -> dict:
    """Run optimizer step ``counters["step"] + 1`` and return its metrics record."""
    t, dist = st.cfg.train, st.dist
    started = time.perf_counter()
    step = st.counters["step"] + 1
    lr = lr_at(
        step, t.lr, t.warmup_steps, total_steps, t.min_lr_ratio, t.schedule, t.decay_fraction
    )
    for group in st.optimizer.param_groups:
        group["lr"] = lr
    loss, aux, routing = _forward_backward(st, autocast)
    grad_norm = dist.clip_grad_norm_(params, clip)
    skipped, spike = _rejected(st, step, loss, grad_norm)
    if not skipped:
        for hook in hooks:
            hook.before_step(lr)
        st.optimizer.step()
    for hook in hooks:
        hook.after_step(skipped)
    st.optimizer.zero_grad(set_to_none=True)

    tokens = t.batch_size * dist.world * t.grad_accum * t.seq_len
    c = st.counters
    c.update(step=step, tokens=c["tokens"] + tokens, flops=c["flops"] + tokens * st.flops_per_token)
    elapsed = time.perf_counter() - started
    c["wall_s"] += elapsed
    record = {
        "step": step,
        "loss": loss,
        "aux_loss": aux,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": c["tokens"],
        "flops": c["flops"],
        "tokens_per_s": tokens / elapsed,
        "skipped": skipped,
        "spike": spike,
    }
    if st.peak_flops:  # model FLOPs utilisation of all devices together
        record["mfu"] = tokens * st.flops_per_token / elapsed / st.peak_flops
    if routing:
        record["routing"] = routing_record(routing, st.cfg)
    return record


def routing_record(stats: list[RouterStats], cfg: Config) -> list[dict[str, float]]:
    """Per MoE layer: each expert's share of the routed slots, the load's min, max and
    coefficient of variation, drops, entropy, losses."""
    moe_layers = [i for i in range(cfg.model.n_layers) if cfg.model.moe.is_moe_layer(i)]
    records = []
    for layer, s in zip(moe_layers, stats, strict=True):
        load = s.slot_counts_KE.sum(dim=0)
        records.append(
            {
                "layer": layer,
                "load": (load / load.sum().clamp(min=1)).tolist(),  # each expert's share
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
