"""What a training run holds and checkpoints: its data order, model, optimizer, spike detector and
counters; built fresh, from ``train.init_from`` or from the checkpoint it resumes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_lab.config import Config, ConfigError
from moe_lab.data.documents import build_tokenizer, load_splits
from moe_lab.data.packing import TokenStore, TrainBatches, build_store, cache_root
from moe_lab.data.tokenizer import Tokenizer, load_tokenizer
from moe_lab.hardware import peak_flops
from moe_lab.nn.model import build_model
from moe_lab.store.checkpoint import (
    SHARDED,
    has_optimizer_state,
    load_checkpoint,
    read_optimizer_state,
    read_training_state,
    save_checkpoint,
    staging_dir,
)
from moe_lab.store.weights import load_weights
from moe_lab.train.distributed import Dist
from moe_lab.train.optim import SpikeDetector, build_optimizer
from moe_lab.train.run_dir import init_checkpoint, init_tokenizer_dir, truncate_metrics

__all__ = ["TrainData", "TrainState", "prepare_data"]

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    tokenizer: Tokenizer
    batches: TrainBatches  # the global batch; each rank trains on its slice
    valid: TokenStore


def prepare_data(
    cfg: Config, world: int, resume_from: Path | None, branched: bool = False
) -> TrainData:
    """Documents to token stores; the tokenizer is the resumed run's, the ``init_from`` or
    ``branch_from`` run's (its weights are tied to those token ids) or a new one fitted on the
    training documents."""
    t = cfg.train
    train_docs, valid_docs, groups = load_splits(cfg)
    source = t.init_from or t.branch_from
    if resume_from is not None and not branched:
        tokenizer = load_tokenizer(Path(cfg.run.dir) / "tokenizer")
    elif source is not None and (source_tokenizer := init_tokenizer_dir(Path(source))):
        tokenizer = load_tokenizer(source_tokenizer)
    else:
        tokenizer = build_tokenizer(cfg, train_docs)
    cache = cache_root(cfg.data.cache_dir)
    text = cfg.data.text_field
    train_store = build_store(train_docs, tokenizer, text, groups, cache, cfg.data.sample_by)
    valid_store = build_store(valid_docs, tokenizer, text, groups, cache)
    batches = TrainBatches(
        train_store,
        t.seq_len,
        t.batch_size * world,
        cfg.run.seed,
        cfg.data.sample_by,
        cfg.data.sampling_alpha,
    )
    return TrainData(tokenizer, batches, valid_store)


class TrainState:
    """The model (and ``step_loss``, its loss wrapped for data parallelism), optimizer, data
    order, spike detector and ``counters``: everything a checkpoint saves and a resume restores."""

    def __init__(self, cfg: Config, dist: Dist, device, batches: TrainBatches, scope=None) -> None:
        t = cfg.train
        self.cfg, self.dist, self.device, self.batches = cfg, dist, device, batches
        self.model = model = build_model(cfg.model, device=device)
        if scope is not None:
            if dist.mode == "fsdp2" or cfg.parallel.ep:
                raise ConfigError(
                    "expert scopes (moe_lab.families.ifc) need parallel.dp=none or ddp, no ep"
                )
            scope.apply(model)
        self.step_loss = None
        self.optimizer = None
        self.scope = scope
        self.detector = SpikeDetector(t.spike_window, t.spike_sigma)
        self.flops_per_token = cfg.model.flops_per_token(t.seq_len)
        peak = peak_flops(torch.device(device), t.peak_flops)  # one device's; None: no MFU
        self.peak_flops = None if peak is None else peak * dist.world
        self.counters = {
            "step": 0,
            "tokens": 0,
            "flops": 0.0,
            "skipped_nonfinite": 0,
            "skipped_spikes": 0,
            "wall_s": 0.0,  # seconds spent in training steps, summed over every resume
        }

    def load_weights(self, resume_from: Path | None) -> None:
        """Full weights from ``train.init_from`` or the resumed checkpoint, before any sharding."""
        t = self.cfg.train
        if resume_from is None and t.init_from is not None:
            source = init_checkpoint(Path(t.init_from))
            load_checkpoint(source, self.model, restore_rng_state=False)
            log.info("%s: initialised from %s", self.cfg.run.dir, source)
        if resume_from is not None and self.dist.mode != "fsdp2":
            load_checkpoint(resume_from, self.model, restore_rng_state=False)

    def distribute(self) -> None:
        """Shard the experts (``parallel.ep``), wrap the model for data parallelism (FSDP2 shards
        the parameters, so this comes before the optimizer), then build the optimizer."""
        cfg, dist = self.cfg, self.dist
        if cfg.parallel.ep:
            dist.shard_experts(self.model, cfg.parallel.ep_degree)
        self.step_loss = dist.wrap(self.model, self.device)
        fsdp2 = dist.mode == "fsdp2"
        self.optimizer = build_optimizer(
            self.model, cfg, self.scope, fused=not fsdp2, mixed_dtensors=fsdp2 and cfg.parallel.ep
        )

    def resume(self, checkpoint: Path, total_steps: int) -> None:
        """Optimizer, counters, data order and spike history from ``checkpoint``, to train on
        to ``total_steps``."""
        dist = self.dist
        saved = read_training_state(checkpoint, self.cfg.run.restore_rng)
        if (saved_world := saved.get("world", dist.world)) != dist.world:
            raise ConfigError(
                f"{checkpoint} was saved by {saved_world} processes and this run has "
                f"{dist.world}: the global batch (train.batch_size per process) and the data "
                "order would change; resume with as many processes, or start a new run.dir"
            )
        if dist.mode == "fsdp2":
            dist.load_sharded(checkpoint / SHARDED, self.model, self.optimizer)
        elif saved["step"] < total_steps or has_optimizer_state(checkpoint):
            # A finished run that dropped its optimizer state (train.keep_optimizer=false) can
            # still be "resumed" with nothing left to train: it is re-evaluated.
            full = read_optimizer_state(checkpoint)
            self.optimizer.load_state_dict(dist.local_optimizer_state(full, self.optimizer))
        # Checkpoints written before wall_s was counted resume with the time they did not count.
        self.counters = {k: saved.get(k, self.counters[k]) for k in self.counters}
        self.batches.load_state_dict(saved["data"], restore_rng=self.cfg.run.restore_rng)
        self.detector.load_state_dict(saved["spike"])
        if dist.is_main:
            truncate_metrics(Path(self.cfg.run.dir) / "metrics.jsonl", self.counters["step"])
        log.info("resumed %s at step %d", checkpoint, self.counters["step"])

    def checkpoint(self) -> None:
        """Every rank calls this (sharded state is written or gathered collectively); rank 0
        writes the rest and commits the checkpoint."""
        dist, step, keep = self.dist, self.counters["step"], self.cfg.train.keep_checkpoints
        directory = Path(self.cfg.run.dir) / "checkpoints"
        extra = {
            **self.counters,
            "world": dist.world,
            "data": self.batches.state_dict(),
            "spike": self.detector.state_dict(),
        }
        if dist.mode == "fsdp2":  # each rank writes its shards; nothing is gathered
            staged = staging_dir(directory, step, create=dist.is_main)
            dist.barrier()
            dist.save_sharded(staged / SHARDED, self.model, self.optimizer)
            dist.barrier()
            if dist.is_main:
                save_checkpoint(directory, step, None, None, extra, keep, staged=True)
            return
        weights = dist.full_state_dict(self.model)
        moments = dist.full_optimizer_state(self.optimizer)
        if dist.is_main:
            save_checkpoint(directory, step, self.model, moments, extra, keep, weights)

    def evaluation_model(self):
        """The model rank 0 evaluates (an unsharded copy if sharded); call on every rank."""
        weights = self.dist.full_state_dict(self.model)
        if weights is None:
            return self.model
        if not self.dist.is_main:
            return None
        # Building draws from rank 0's generator only: a resumed run, which restores one state
        # on every rank, would then draw different jitter on the other ranks.
        device = self.device
        on_gpu = [device] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=on_gpu):
            copy = build_model(self.cfg.model, device=device)
        load_weights(copy, {k: v.to(device) for k, v in weights.items()})
        return copy
