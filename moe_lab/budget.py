"""Every split of a training budget: steps from FLOPs, shares of a budget, phases of a family.

A run's budget is the first of ``train.max_flops``, ``max_tokens``, ``max_steps`` that is set. A
family that trains in several runs (a seed, then experts; a public phase, then domains) gives each
run a :func:`share` of it; :func:`achievable` says what those runs reach in whole optimizer steps,
which ``moe-lab compare`` checks against the experiment's budget before anything trains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from moe_lab.config import Config, ConfigError, TrainConfig

__all__ = [
    "BUDGET_KEYS",
    "BUDGET_SPLITS",
    "Phase",
    "achievable",
    "achieved_flops",
    "planned_steps",
    "share",
    "split",
]

BUDGET_KEYS = ("max_flops", "max_tokens", "max_steps")  # the first one set is the budget
BUDGET_SPLITS = ("equal", "proportional", "each")


def share(train: TrainConfig, fraction: float) -> dict[str, float | int | None]:
    """The three budget fields for ``fraction`` of ``train``'s budget: its first set field scaled
    (FLOPs as a float, tokens and steps whole and at least 1), the others None."""
    for key in BUDGET_KEYS:
        total = getattr(train, key)
        if total is not None:
            value = float(total * fraction) if key == "max_flops" else max(1, int(total * fraction))
            return {"max_flops": None, "max_tokens": None, "max_steps": None, key: value}
    raise ConfigError("set a training budget: train.max_flops, max_tokens or max_steps")


def split(
    train: TrainConfig, names: Sequence[str], how: str, sizes: Mapping[str, float] | None = None
) -> dict[str, dict]:
    """Each expert's budget fields: ``equal`` shares, ``proportional`` to ``sizes`` (e.g. bytes of
    each shard), or ``each``: the whole budget per expert (an expert added later)."""
    if how not in BUDGET_SPLITS:
        raise ConfigError(f"budget split must be one of {BUDGET_SPLITS}, got {how!r}")
    if how == "each":
        fractions = {name: 1.0 for name in names}
    elif how == "equal":
        fractions = {name: 1 / len(names) for name in names}
    else:
        if sizes is None:
            raise ValueError("a proportional split needs the shards' sizes")
        fractions = {name: sizes[name] / sum(sizes[n] for n in names) for name in names}
    return {name: share(train, f) for name, f in fractions.items()}


def planned_steps(cfg: Config, world: int = 1) -> int:
    """Optimizer steps of a run over ``world`` data-parallel ranks: its budget in FLOPs, tokens or
    steps (first set wins)."""
    t = cfg.train
    tokens_per_step = t.batch_size * world * t.grad_accum * t.seq_len
    if t.max_flops is not None:
        per_step = tokens_per_step * cfg.model.flops_per_token(t.seq_len)
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


def achieved_flops(cfg: Config, flops: float) -> float:
    """Training FLOPs a run given ``flops`` achieves (whole steps only)."""
    t = cfg.train
    per_step = t.batch_size * t.grad_accum * t.seq_len * cfg.model.flops_per_token(t.seq_len)
    return planned_steps(replace(cfg, train=replace(t, max_flops=flops))) * per_step


@dataclass(frozen=True)
class Phase:
    """``count`` training runs of ``cfg``, each given ``share`` of a family's budget."""

    cfg: Config
    share: float
    count: int = 1


def achievable(phases: Sequence[Phase], budget: float) -> float:
    """Training FLOPs that ``phases`` reach, in whole steps, given ``budget`` FLOPs in all."""
    return sum(p.count * achieved_flops(p.cfg, budget * p.share) for p in phases)
