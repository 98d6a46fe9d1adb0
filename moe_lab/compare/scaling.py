"""Scaling fits over comparisons at several budgets."""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import curve_fit

__all__ = ["fit_scaling"]


def fit_scaling(records: list[dict]) -> dict:
    """Fit ``L(C) = E + A * C^-gamma`` to (training FLOPs, validation loss) of one family.

    Needs at least 3 distinct budgets; returns ``{"E", "A", "gamma", "rmse"}``.
    """
    c = np.array([r["train_flops"] for r in records], dtype=np.float64)
    loss = np.array([r["valid_loss"] for r in records], dtype=np.float64)
    if len(set(c.tolist())) < 3:
        raise ValueError("a scaling fit needs results at 3 or more different budgets")
    scale = c.min()  # fit in units of the smallest budget: well-conditioned parameters

    def law(x, e, a, gamma):
        return e + a * x ** (-gamma)

    (e, a, gamma), _ = curve_fit(
        law,
        c / scale,
        loss,
        p0=(loss.min() * 0.9, loss.max() - loss.min() + 1e-3, 0.3),
        bounds=([0, 0, 0], [np.inf, np.inf, 5]),
        maxfev=20000,
    )
    rmse = math.sqrt(float(np.mean((law(c / scale, e, a, gamma) - loss) ** 2)))
    return {"E": e, "A": a * scale**gamma, "gamma": gamma, "rmse": rmse}
