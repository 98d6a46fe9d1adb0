"""Planning a comparison before anything trains: every variant's config and the FLOPs its runs
reach in whole steps, refusing what cannot be compared fairly."""

from __future__ import annotations

from pathlib import Path

from moe_lab.budget import Phase, achievable
from moe_lab.compare.experiment import ExperimentConfig, VariantConfig, variant_config
from moe_lab.config import ConfigError
from moe_lab.families.registry import get_family

__all__ = ["SHARED_DATA", "plan"]

# What every variant must share, so that their losses are comparable.
SHARED_DATA = (
    "train_files",
    "valid_files",
    "valid_fraction",
    "text_field",
    "group_fields",
    "include",
    "tokenizer",
    "bpe_vocab_size",
)


WSD_FAMILIES = ("dense", "moe")  # one training run each: a decay branch per budget


def plan(exp: ExperimentConfig, out: Path) -> dict[str, dict]:
    """Per variant: its config and, per budget, the FLOPs it reaches; refuse what cannot be
    compared.

    Raises:
        ConfigError: a variant that cannot fit its smallest run in a budget, misses one by more
            than 1%, or changes the tokenizer or evaluation data.
    """
    reference = None
    plans = {}
    for v in exp.variants:
        first = exp.budgets[0]
        cfg = variant_config(exp, v, exp.seeds[0], exp.job_dir(v.name, first, 0), first)
        data = {k: getattr(cfg.data, k) for k in SHARED_DATA}
        if reference is None:
            reference = (v.name, data)
        elif data != reference[1]:
            diff = sorted(k for k in SHARED_DATA if data[k] != reference[1][k])
            raise ConfigError(
                f"variant {v.name!r} changes data.{', data.'.join(diff)} relative to "
                f"{reference[0]!r}: every variant must share the tokenizer and evaluation data"
            )
        family = get_family(v.family)
        if v.merge not in ("none", "average", "btx"):
            raise ConfigError(f"variant {v.name!r}: merge must be none, average or btx")
        if v.merge == "btx" and not 0 < v.finetune_share < 1 - v.seed_share:
            raise ConfigError(f"variant {v.name!r}: finetune_share must be in (0, 1 - seed_share)")
        family.check(cfg, v)
        if exp.budget.schedule == "wsd" and v.family not in WSD_FAMILIES:
            raise ConfigError(
                f"variant {v.name!r}: budget.schedule=wsd branches one training run per budget "
                f"from a shared trunk; family {v.family!r} trains several (only "
                f"{', '.join(WSD_FAMILIES)})"
            )
        phases = family.phases(cfg, v)
        tolerance = exp.budget.tolerance
        reached = {b: _reached(v, phases, b, tolerance) for b in exp.budgets}
        plans[v.name] = {"config": cfg, "flops": reached}
    return plans


def _reached(v: VariantConfig, phases: list[Phase], budget: float, tolerance: float) -> float:
    try:
        achieved = achievable(phases, budget)
    except ConfigError as e:
        msg = f"variant {v.name!r}: its smallest run exceeds the budget {budget:.4g} ({e})"
        raise ConfigError(msg) from None
    if abs(achieved - budget) > tolerance * budget:
        raise ConfigError(
            f"variant {v.name!r} can only reach {achieved:.4g} of the {budget:.4g} FLOP budget "
            f"in whole steps (more than {tolerance:.0%} off): raise the budget or "
            "lower train.batch_size / seq_len"
        )
    return achieved
