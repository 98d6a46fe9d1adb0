"""A training run's directory: refusing to overwrite or to resume with another config, the
checkpoint and tokenizer that ``train.init_from`` names, and the metrics log a resume rewinds."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from omegaconf import OmegaConf

from moe_lab.budget import BUDGET_KEYS
from moe_lab.config import Config, ConfigError, load_config
from moe_lab.store.checkpoint import MARKER, find_checkpoint, latest_checkpoint
from moe_lab.store.metrics import read_metrics

__all__ = [
    "RESUMABLE_KEYS",
    "RunLock",
    "branch_checkpoint",
    "init_checkpoint",
    "init_tokenizer_dir",
    "prepare_run_dir",
    "truncate_metrics",
]

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
    "train.final_eval",
    "train.peak_flops",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.keep_optimizer",
    "train.progress",
    "train.tensorboard",
    "train.wandb",
    "train.wandb_project",
    "train.on_nonfinite",
    "train.spike_action",
    "train.compile",
    "run.dir",
    "run.resume",
    "run.restore_rng",
    "run.device",
    "run.threads",
    "data.cache_dir",
}


# What a decay branch (train.branch_from) may change of the run it continues.
BRANCHABLE_KEYS = RESUMABLE_KEYS | {
    "train.schedule",
    "train.decay_fraction",
    "train.branch_from",
}

# Sections the training loop never reads: the experiments that orchestrate runs (a language added
# to an X-ELM run, a new access policy) may change them and still resume or reuse finished runs.
NOT_TRAINING = ("cluster", "ensemble", "ifc", "xelm")


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


def _changed(old: dict, new: dict, allowed: set[str]) -> list[str]:
    """The training keys that differ between two flattened configs, beyond ``allowed``."""
    return sorted(
        k
        for k, v in new.items()
        if old.get(k) != v and k not in allowed and k.split(".")[0] not in NOT_TRAINING
    )


def branch_checkpoint(cfg: Config) -> Path:
    """The checkpoint ``train.branch_from`` names, checked to belong to a run that differs from
    ``cfg`` in its budget, schedule and the keys a resume may change only."""
    ckpt = init_checkpoint(Path(cfg.train.branch_from), "train.branch_from")
    source = ckpt.parent.parent / "config.yaml"
    if not source.is_file():
        raise ConfigError(f"train.branch_from: {source} (the run's config) is missing")
    changed = _changed(_flat(load_config(source)), _flat(cfg), BRANCHABLE_KEYS)
    if changed:
        raise ConfigError(
            f"cannot branch from {ckpt} with a different {', '.join(changed)}: a branch "
            "continues that run, changing only its budget, schedule and logging"
        )
    return ckpt


def prepare_run_dir(cfg: Config) -> Path | None:
    """Check the run directory; return the checkpoint to resume from, if any."""
    run_dir = Path(cfg.run.dir)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if not cfg.run.resume:
        if (run_dir / "metrics.jsonl").exists() or ckpt is not None:
            if not cfg.run.overwrite:
                raise ConfigError(
                    f"run.dir {run_dir} already holds a run: set run.resume=true to continue "
                    "it, run.overwrite=true to replace it, or choose another run.dir"
                )
            _clear(run_dir)
        return None
    if ckpt is None:
        return None
    old, new = _flat(load_config(run_dir / "config.yaml")), _flat(cfg)
    changed = _changed(old, new, RESUMABLE_KEYS)
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir} with a different {', '.join(changed)}; only "
            f"{', '.join(sorted(RESUMABLE_KEYS))} may change"
        )
    budget_changed = any(old.get(f"train.{b}") != new[f"train.{b}"] for b in BUDGET_KEYS)
    if budget_changed and cfg.train.schedule != "constant":  # a constant rate has no length
        log.warning(
            "the budget changed on resume: the schedule is re-stretched to the new length, "
            "so the run no longer matches an uninterrupted one"
        )
    return ckpt


def _clear(run_dir: Path) -> None:
    """Remove a run's files for ``run.overwrite``; the lock the caller holds stays."""
    log.warning("run.overwrite=true: deleting the run in %s", run_dir)
    for entry in run_dir.iterdir():
        if entry.name == RunLock.FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def init_checkpoint(path: Path, key: str = "train.init_from") -> Path:
    """The checkpoint ``key`` names: a checkpoint directory or a run's latest one."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise ConfigError(
            f"{key} ({path}) is neither a checkpoint nor a run directory with a complete checkpoint"
        )
    return ckpt


def init_tokenizer_dir(path: Path) -> Path | None:
    """The tokenizer saved with the run that ``train.init_from`` names, if any."""
    run = path.parent.parent if (path / MARKER).is_file() else path  # a checkpoint
    return run / "tokenizer" if (run / "tokenizer").is_dir() else None


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric records up to ``step``: later ones (and a torn last line) belong to the
    interrupted attempt that the resumed run repeats."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class RunLock:
    """One writer per directory: an exclusive ``flock`` on ``directory/.lock`` held while the
    context is open. A second writer gets a :class:`ConfigError` naming the holder. The kernel
    drops the lock when its process dies, however it dies, so a lock file left by a dead
    process is simply taken over."""

    FILE = ".lock"

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / self.FILE
        self._file = None
        self._created = False

    def __enter__(self) -> RunLock:
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise ConfigError(f"{self.path.parent} is a file, not a directory")
        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"{self.path.parent} is in use by {holder}: wait for it to finish, or choose "
                "another run.dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        directory = self.path.parent
        if self._created and [p.name for p in directory.iterdir()] == [".lock"]:
            # Nothing was written (refused before training): leave no directory behind.
            with contextlib.suppress(OSError):
                self.path.unlink()
                directory.rmdir()
