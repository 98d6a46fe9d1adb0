"""Scaling fits over a budget sweep: ``L(C) = E + A * C^-gamma`` per variant, bootstrap intervals,
where two variants' curves cross, and what each predicts beyond the largest budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import numpy as np
from scipy.optimize import brentq, curve_fit

__all__ = [
    "BOOTSTRAP",
    "bootstrap_fits",
    "budget_of",
    "crossover",
    "fit_scaling",
    "interval95",
    "law",
    "scaling_study",
]

BOOTSTRAP = 200  # resamples behind every interval
EXTRAPOLATE = (10, 100)  # predictions at these multiples of the largest budget
CROSS_RANGE = 1000  # crossovers are searched up to this multiple of the largest budget


def law(c, e: float, a: float, gamma: float):
    """``E + A * C^-gamma``."""
    return e + a * np.asarray(c, dtype=np.float64) ** (-gamma)


def fit_scaling(records: list[dict]) -> dict:
    """Fit ``L(C) = E + A * C^-gamma`` to (training FLOPs, validation loss) of one variant.

    Needs at least 3 distinct budgets; returns ``{"E", "A", "gamma", "rmse"}``.
    """
    c = np.array([r["train_flops"] for r in records], dtype=np.float64)
    loss = np.array([r["valid_loss"] for r in records], dtype=np.float64)
    if len(set(c.tolist())) < 3:
        raise ValueError("a scaling fit needs results at 3 or more different budgets")
    scale = c.min()  # fit in units of the smallest budget: well-conditioned parameters
    (e, a, gamma), _ = curve_fit(
        law,
        c / scale,
        loss,
        p0=(loss.min() * 0.9, loss.max() - loss.min() + 1e-3, 0.3),
        bounds=([0, 0, 0], [np.inf, np.inf, 5]),
        maxfev=20000,
    )
    rmse = math.sqrt(float(np.mean((law(c / scale, e, a, gamma) - loss) ** 2)))
    return {"E": float(e), "A": float(a * scale**gamma), "gamma": float(gamma), "rmse": rmse}


def bootstrap_fits(
    records: list[dict],
    n: int = BOOTSTRAP,
    seed: int = 0,
    fit: Callable[[list[dict]], dict] | None = None,
    cell: Callable[[dict], Hashable] | None = None,
) -> list[dict]:
    """``fit`` (default :func:`fit_scaling`) of ``n`` resamples: in every ``cell`` (default: a
    budget) its records (seeds) drawn with replacement. Resamples whose fit fails are left out."""
    fit, cell = fit or fit_scaling, cell or budget_of
    rng = np.random.default_rng(seed)
    cells: dict[Hashable, list[dict]] = {}
    for r in records:
        cells.setdefault(cell(r), []).append(r)
    fits = []
    for _ in range(n):
        sample = [rs[i] for rs in cells.values() for i in rng.integers(0, len(rs), len(rs))]
        try:
            fits.append(fit(sample))
        except (RuntimeError, ValueError):  # curve_fit found no optimum for this resample
            continue
    return fits


def crossover(f: dict, g: dict, low: float, high: float) -> float | None:
    """The smallest budget in ``[low, high]`` where curve ``f`` drops below or rises above ``g``
    (their difference changes sign); None where they do not cross there."""
    grid = np.geomspace(low, high, 400)
    diff = law(grid, f["E"], f["A"], f["gamma"]) - law(grid, g["E"], g["A"], g["gamma"])
    change = np.nonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0)[0]
    if len(change) == 0:
        return None
    i = int(change[0])

    def gap(log_c: float) -> float:
        c = math.exp(log_c)
        return float(law(c, f["E"], f["A"], f["gamma"]) - law(c, g["E"], g["A"], g["gamma"]))

    return math.exp(brentq(gap, math.log(grid[i]), math.log(grid[i + 1])))


def budget_of(record: dict) -> float:
    """The budget a record was trained for (its achieved FLOPs where it names none)."""
    return record.get("budget_flops", record["train_flops"])


def interval95(values: list[float]) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of bootstrap values (NaN, NaN without any)."""
    if not values:
        return math.nan, math.nan
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def scaling_study(records: list[dict], baseline: str, n: int = BOOTSTRAP) -> dict[str, dict]:
    """Per variant with 3+ budgets: its fit, 95% bootstrap intervals of the parameters, the
    predicted loss at 10x and 100x the largest budget, and, against ``baseline``, where the
    curves cross (searched up to 1000x the largest budget) with the share of resamples that
    cross there too."""
    names = list(dict.fromkeys(r["name"] for r in records))
    largest = max(budget_of(r) for r in records)
    smallest = min(budget_of(r) for r in records)
    fits, boots = {}, {}
    for name in names:
        mine = [r for r in records if r["name"] == name]
        try:
            fits[name] = fit_scaling(mine)
        except (RuntimeError, ValueError):
            continue
        boots[name] = bootstrap_fits(mine, n)
    study = {}
    for name, fit in fits.items():
        entry = {"fit": fit, "intervals": {}, "predicted": {}}
        for key in ("E", "A", "gamma"):
            entry["intervals"][key] = interval95([b[key] for b in boots[name]])
        for x in EXTRAPOLATE:
            c = x * largest
            samples = [float(law(c, b["E"], b["A"], b["gamma"])) for b in boots[name]]
            entry["predicted"][f"{x}x"] = {
                "flops": c,
                "loss": float(law(c, fit["E"], fit["A"], fit["gamma"])),
                "interval": interval95(samples),
            }
        grid = np.geomspace(smallest, max(EXTRAPOLATE) * largest, 60)
        curves = np.array([law(grid, b["E"], b["A"], b["gamma"]) for b in boots[name]])
        entry["band"] = {
            "flops": grid.tolist(),
            "loss": law(grid, fit["E"], fit["A"], fit["gamma"]).tolist(),
            "low": np.percentile(curves, 2.5, axis=0).tolist() if len(curves) else [],
            "high": np.percentile(curves, 97.5, axis=0).tolist() if len(curves) else [],
        }
        if name != baseline and baseline in fits:
            entry["crossover"] = _crossing(
                fit, fits[baseline], boots[name], boots[baseline], smallest, CROSS_RANGE * largest
            )
        study[name] = entry
    return study


def _crossing(fit, base, boots, base_boots, low, high) -> dict:
    """Where ``fit`` crosses ``base``, and over paired resamples how often and where they cross."""
    at = crossover(fit, base, low, high)
    pairs = zip(boots, base_boots, strict=False)
    crossings = [c for f, g in pairs if (c := crossover(f, g, low, high)) is not None]
    n = min(len(boots), len(base_boots))
    return {
        "flops": at,
        "interval": interval95(crossings),
        "share": len(crossings) / n if n else math.nan,
        "searched": (low, high),
    }
