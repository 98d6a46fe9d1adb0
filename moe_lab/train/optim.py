"""The optimizer and its schedule: AdamW with decay on matrices only; linear warmup, then cosine to
``min_lr_ratio`` of the peak, or warmup-stable-decay; and the loss-spike detector that may skip a
step."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch

from moe_lab.config import Config

__all__ = ["SpikeDetector", "build_optimizer", "decay_start", "lr_at"]


def decay_start(total: int, decay_fraction: float) -> int:
    """The last step at the peak of a warmup-stable-decay run of ``total`` steps: its decay takes
    the final ``round(decay_fraction * total)`` steps."""
    return total - round(decay_fraction * total)


def lr_at(
    step: int,
    peak: float,
    warmup: int,
    total: int,
    min_ratio: float,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate of optimizer step ``step`` (1-based) after a linear warmup: ``cosine`` decays
    to ``min_ratio`` of the peak over the rest of ``total``; ``wsd`` (warmup-stable-decay, Hägele et
    al. 2024) holds the peak, then decays linearly to ``min_ratio`` over the last
    ``decay_fraction`` of ``total``; ``constant`` holds the peak (a WSD run's stable trunk, which
    decay branches continue: see ``train.branch_from``)."""
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    if schedule == "wsd":
        start = decay_start(total, decay_fraction)
        if step <= start:
            return peak
        return peak * (1 - (1 - min_ratio) * (step - start) / max(1, total - start))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(
    model: torch.nn.Module,
    cfg: Config,
    scope=None,
    fused: bool = True,
    mixed_dtensors: bool = False,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; ``scope`` (an IFC expert scope) may set the groups."""
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
