"""Experiment trackers the loop sends each step's numbers to, next to ``metrics.jsonl`` (which
stays the record of the run): TensorBoard (``train.tensorboard``) and Weights & Biases
(``train.wandb``). Both are optional installs, imported only when asked for."""

from __future__ import annotations

import importlib.util
import numbers
import uuid
from pathlib import Path

from omegaconf import OmegaConf

from moe_lab.config import Config, ConfigError

__all__ = ["Tracker", "check_trackers", "open_trackers", "scalars"]

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # config flag -> what it needs


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record a tracker plots: every real scalar but the step."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


class Tracker:
    def log(self, record: dict, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict, step: int) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    """One W&B run per run directory: its id is kept in ``wandb-id`` so that a resumed run
    continues the same W&B run. ``WANDB_MODE=offline`` logs without a network (``wandb sync``
    uploads later)."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        import wandb

        id_file = run_dir / "wandb-id"
        if not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:12])
        self.run = wandb.init(
            project=cfg.train.wandb_project,
            name=run_dir.name,
            id=id_file.read_text().strip(),
            resume="allow",
            dir=str(run_dir),
            config=OmegaConf.to_container(OmegaConf.structured(cfg)),
        )

    def log(self, record: dict, step: int) -> None:
        self.run.log(scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()


def check_trackers(cfg: Config) -> None:
    """Refuse, before anything is written, a tracker whose package is not installed."""
    for flag, package in _PACKAGES.items():
        if getattr(cfg.train, flag) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.{flag}=true needs {package}: pip install {package}")


def open_trackers(cfg: Config, run_dir: Path) -> list[Tracker]:
    """The trackers ``cfg.train`` asks for, writing under ``run_dir``; call on rank 0 only."""
    t = cfg.train
    trackers: list[Tracker] = []
    if t.tensorboard:
        trackers.append(TensorBoard(run_dir))
    if t.wandb:
        trackers.append(WandB(cfg, run_dir))
    return trackers
