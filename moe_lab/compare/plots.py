"""Plots of a comparison (matplotlib, no display needed): validation loss against training FLOPs
with the fitted curves, their bootstrap bands and the crossovers; the loss per group value as a
heatmap of differences from the baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_lab.compare.scaling import budget_of
from moe_lab.compare.summary import group_columns, routings

__all__ = ["plot_compare", "plot_scaling"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compare(records: list[dict], out_dir: Path, study: dict, baseline: str) -> None:
    """``loss_vs_flops.png``, ``groups.png`` and, where variants route, ``routing.png`` in
    ``out_dir``."""
    plot_scaling(records, study, out_dir / "loss_vs_flops.png", baseline)
    _groups(records, baseline, out_dir / "groups.png")
    _routing(records, out_dir / "routing.png")


def plot_scaling(records: list[dict], study: dict, out: Path, baseline: str | None = None) -> Path:
    """Validation loss against training FLOPs: each variant's mean over seeds (bars: min to max),
    its fitted ``E + A C^-gamma`` with the 95% bootstrap band where ``study`` has one, and where it
    crosses ``baseline``'s curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(dict.fromkeys(r["name"] for r in records)):
        color = f"C{i}"
        rs = [r for r in records if r["name"] == name]
        budgets = sorted({budget_of(r) for r in rs})
        at = [[r for r in rs if budget_of(r) == b] for b in budgets]
        c = [np.mean([r["train_flops"] for r in group]) for group in at]
        losses = [[r["valid_loss"] for r in group] for group in at]
        mean = np.array([np.mean(v) for v in losses])
        spread = [mean - [min(v) for v in losses], [max(v) for v in losses] - mean]
        ax.errorbar(c, mean, yerr=spread, fmt="o", color=color, capsize=3, label=name)
        s = study.get(name)
        if s is not None:
            band = s["band"]
            ax.plot(band["flops"], band["loss"], "-", color=color, alpha=0.8, linewidth=1)
            if band["low"]:
                ax.fill_between(band["flops"], band["low"], band["high"], color=color, alpha=0.15)
            cross = s.get("crossover")
            if cross and cross["flops"] is not None:
                ax.axvline(cross["flops"], color=color, linestyle="--", linewidth=1)
                ax.annotate(f"crosses {baseline}", (cross["flops"], mean.min()), color=color,
                            fontsize=7, rotation=90, va="bottom", ha="right")  # fmt: skip
    ax.set(xlabel="training FLOPs", ylabel="validation loss (nats/token)", xscale="log")
    ax.set_title(
        "Validation loss against training compute" + (" (fits: 95% bands)" if study else "")
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _groups(records: list[dict], baseline: str, out: Path) -> None:
    """Heatmap at the largest budget: each variant's mean validation loss per group value minus
    the baseline's (blue: lower than the baseline)."""
    plt = _pyplot()
    top = max(budget_of(r) for r in records)
    at = [r for r in records if budget_of(r) == top]
    keys = group_columns(at)[0]
    names = [n for n in dict.fromkeys(r["name"] for r in at) if n != baseline] or [baseline]

    def mean(name, f, g):
        return np.mean([r["groups"].get(f, {}).get(g, np.nan) for r in at if r["name"] == name])

    diff = np.array([[mean(n, f, g) - mean(baseline, f, g) for f, g in keys] for n in names])
    limit = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(keys) + 2), max(3.2, 0.5 * len(names) + 2)))
    image = ax.imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit or 1.0, aspect="auto")
    ax.set_xticks(range(len(keys)), [f"{f}={g}" for f, g in keys], rotation=60, ha="right",
                  fontsize=7)  # fmt: skip
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for (i, j), value in np.ndenumerate(diff):
        if np.isfinite(value):
            ax.text(j, i, f"{value:+.3f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label=f"loss − {baseline}'s (nats/token)")
    ax.set_title(f"Per group at {top:.3g} training FLOPs, against {baseline}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _routing(records: list[dict], out: Path) -> None:
    """Per variant with routers, at the largest budget and its first seed: the last router
    layer's share of each group value per expert (uniform: 1/E)."""
    top, routed = routings(records)
    if not routed:
        return
    plt = _pyplot()
    routed = {name: routing["groups"] for name, routing in routed.items()}
    shown = group_columns(records)[0]
    rows = {n: [(f, v) for f, v in shown if v in g.get(f, {})] for n, g in routed.items()}
    height = 1.2 + 0.3 * max(map(len, rows.values()))
    fig, axes = plt.subplots(1, len(routed), squeeze=False, figsize=(4.2 * len(routed), height))
    for ax, (name, groups) in zip(axes[0], routed.items(), strict=True):
        matrix = np.array([groups[f][v][-1] for f, v in rows[name]])
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_yticks(range(len(rows[name])), [f"{f}={v}" for f, v in rows[name]], fontsize=7)
        ax.set_xticks(range(matrix.shape[1]))
        ax.set(title=name, xlabel=f"expert (uniform = 1/{matrix.shape[1]})")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"share of each group per expert, last router layer, {top:.3g} training FLOPs")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
