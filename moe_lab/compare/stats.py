"""Is a difference between two variants real? Paired differences over seeds, with a t interval.

Two variants trained with the same seed share the data order and the initialisation draws that
their configs have in common, so their losses are compared seed by seed (a paired test), which
removes the seed-to-seed spread they share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["LEVEL", "paired_difference", "significance"]

LEVEL = 0.95  # confidence level of every interval the report gives


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict:
    """``a - b`` paired by seed: mean, ``level`` t interval, two-sided p-value of the paired t-test,
    and ``significant`` (the interval excludes 0). One pair gives the difference alone (no
    interval: ``low``/``high``/``p`` NaN, not significant)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(f"paired_difference needs two equal-length 1-D samples, got {d.shape}")
    n, mean = len(d), float(d.mean())
    if n == 1:
        return {"mean": mean, "low": math.nan, "high": math.nan, "p": math.nan, "n": 1,
                "significant": False}  # fmt: skip
    sem = float(d.std(ddof=1)) / math.sqrt(n)
    if sem == 0.0:  # identical differences on every seed
        p = 0.0 if mean != 0 else 1.0
        return {"mean": mean, "low": mean, "high": mean, "p": p, "n": n, "significant": mean != 0}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sem
    p = float(2 * stats.t.sf(abs(mean) / sem, n - 1))
    low, high = mean - half, mean + half
    return {"mean": mean, "low": low, "high": high, "p": p, "n": n,
            "significant": low > 0 or high < 0}  # fmt: skip


def _by_seed(records: list[dict], metric) -> dict[int, float]:
    return {r["seed"]: metric(r) for r in records}


def significance(records: list[dict], baseline: str, budget: float) -> dict[str, dict]:
    """At ``budget``, every other variant against ``baseline`` over their common seeds: the paired
    difference of the validation loss overall (``"overall"``) and per group value
    (``"domain=legal"``); negative means the variant's loss is lower."""
    at = [r for r in records if r["budget_flops"] == budget]
    base = [r for r in at if r["name"] == baseline]
    groups = sorted({(f, g) for r in base for f, values in r["groups"].items() for g in values})
    metrics = {"overall": lambda r: r["valid_loss"]}
    for f, g in groups:
        metrics[f"{f}={g}"] = lambda r, f=f, g=g: r["groups"].get(f, {}).get(g, math.nan)
    out = {}
    for name in dict.fromkeys(r["name"] for r in at):
        if name == baseline:
            continue
        mine = [r for r in at if r["name"] == name]
        out[name] = {}
        for key, metric in metrics.items():
            a, b = _by_seed(mine, metric), _by_seed(base, metric)
            seeds = sorted(set(a) & set(b))
            if seeds:
                out[name][key] = paired_difference([a[s] for s in seeds], [b[s] for s in seeds])
    return out
