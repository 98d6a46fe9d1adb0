"""Scaling fits in model size and data: ``L(N, D) = E + A * N^-alpha + B * D^-beta`` (Hoffmann et
al. 2022, "Training Compute-Optimal Large Language Models", approach 3) per family whose variants
differ in size, with bootstrap intervals and the compute-optimal split of a budget.

N is a variant's active parameters (what a token touches; every parameter for a dense model), D
the tokens it trained on. With ``C = 6 N D``, the loss at budget C is lowest at
``N_opt = G * (C / 6)^(beta / (alpha + beta))``, ``G = (alpha A / (beta B))^(1 / (alpha + beta))``.
The fit needs at least two sizes and two budgets, and more records than its five parameters.

The intervals resample each (variant, budget)'s seeds, as :mod:`moe_lab.compare.scaling` does;
with few seeds they are too narrow. In 20 synthetic sweeps (Hoffmann et al.'s law, 3 sizes x 3
budgets x 3 seeds, noise 0.003 nats) the 95% intervals held the true alpha 13 times, beta 18 and
E 17 (``tests/test_scaling.py`` builds the same sweeps).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import curve_fit

from moe_lab.compare.scaling import (
    BOOTSTRAP,
    EXTRAPOLATE,
    bootstrap_fits,
    budget_of,
    interval95,
)

__all__ = ["fit_nd", "law_nd", "nd_study", "optimal_size"]

MIN_SIZES, MIN_BUDGETS, MIN_RECORDS = 2, 2, 6
# Starting points for (alpha, beta): the least-squares surface has local minima (Hoffmann et al.
# fit from a grid of initialisations too); the best of these is kept.
STARTS = ((0.3, 0.3), (0.5, 0.2), (0.2, 0.5), (0.8, 0.8))


def law_nd(n, d, e: float, a: float, alpha: float, b: float, beta: float):
    """``E + A * N^-alpha + B * D^-beta``."""
    n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
    return e + a * n ** (-alpha) + b * d ** (-beta)


def _points(records: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.array([r["active_params"] for r in records], dtype=np.float64)
    d = np.array([r["tokens"] for r in records], dtype=np.float64)
    return n, d, np.array([r["valid_loss"] for r in records], dtype=np.float64)


def fit_nd(records: list[dict]) -> dict:
    """Fit ``L(N, D)`` to (active parameters, tokens, validation loss) of the records.

    Returns ``{"E", "A", "alpha", "B", "beta", "rmse"}``; a ValueError without enough sizes,
    budgets or records, a RuntimeError where no start converges."""
    n, d, loss = _points(records)
    if len(set(n.tolist())) < MIN_SIZES or len({budget_of(r) for r in records}) < MIN_BUDGETS:
        raise ValueError(f"an L(N, D) fit needs {MIN_SIZES}+ sizes and {MIN_BUDGETS}+ budgets")
    if len(records) < MIN_RECORDS:
        raise ValueError(f"an L(N, D) fit needs {MIN_RECORDS}+ records, got {len(records)}")
    n0, d0 = n.min(), d.min()  # fit in units of the smallest: well-conditioned parameters

    def model(x, e, a, alpha, b, beta):
        return law_nd(x[0], x[1], e, a, alpha, b, beta)

    x = np.stack([n / n0, d / d0])
    best = None
    spread = loss.max() - loss.min() + 1e-3
    for alpha0, beta0 in STARTS:
        try:
            p, _ = curve_fit(
                model,
                x,
                loss,
                p0=(loss.min() * 0.9, spread, alpha0, spread, beta0),
                bounds=([0, 0, 0, 0, 0], [np.inf, np.inf, 3, np.inf, 3]),
                maxfev=20000,
            )
        except RuntimeError:
            continue
        rmse = math.sqrt(float(np.mean((model(x, *p) - loss) ** 2)))
        if best is None or rmse < best[1]:
            best = (p, rmse)
    if best is None:
        raise RuntimeError("no L(N, D) fit converged")
    (e, a, alpha, b, beta), rmse = best
    return {"E": float(e), "A": float(a * n0**alpha), "alpha": float(alpha),
            "B": float(b * d0**beta), "beta": float(beta), "rmse": rmse}  # fmt: skip


def optimal_size(fit: dict, flops: float) -> tuple[float, float]:
    """The (N, D) with ``6 N D = flops`` that minimise the fitted loss."""
    alpha, beta = fit["alpha"], fit["beta"]
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1 / (alpha + beta))
    n = g * (flops / 6) ** (beta / (alpha + beta))
    return n, flops / (6 * n)


def nd_study(records: list[dict], n: int = BOOTSTRAP, seed: int = 0) -> dict[str, dict]:
    """Per family whose variants come in 2+ sizes: its ``L(N, D)`` fit, 95% bootstrap intervals
    (each (variant, budget)'s seeds drawn with replacement) and the compute-optimal size and
    tokens, with intervals, at the largest budget and 10x and 100x it."""
    largest = max(budget_of(r) for r in records)
    study = {}
    sized = [r for r in records if {"family", "active_params", "tokens"} <= r.keys()]
    for family in dict.fromkeys(r["family"] for r in sized):
        mine = [r for r in sized if r["family"] == family]
        try:
            fit = fit_nd(mine)
        except (RuntimeError, ValueError):
            continue
        boots = bootstrap_fits(mine, n, seed, fit_nd, lambda r: (r["name"], budget_of(r)))
        keys = ("E", "A", "alpha", "B", "beta")
        entry = {"fit": fit, "intervals": {k: interval95([b[k] for b in boots]) for k in keys}}
        entry["variants"] = sorted({r["name"] for r in mine})
        entry["optimal"] = {}
        for x in (1, *EXTRAPOLATE):
            c = x * largest
            n_opt, d_opt = optimal_size(fit, c)
            sizes = [optimal_size(b, c)[0] for b in boots]
            entry["optimal"][f"{x}x"] = {"flops": c, "params": n_opt, "tokens": d_opt,
                                         "params_interval": interval95(sizes)}  # fmt: skip
        study[family] = entry
    return study
