"""Figures of a routing analysis (``routing.json``, see :mod:`moe_lab.eval.routing_run`):
matplotlib, no display needed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["plot_routing"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, n: int, title: str, cell: tuple[float, float]):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.suptitle(title)
    return fig, list(axes.flat[:n])


def _heatmap(fig, ax, matrix: np.ndarray, rows: list[str], title: str, vmax: float) -> None:
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set(title=title, xlabel="expert")
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_yticks(range(len(rows)), labels=rows)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def plot_routing(report: dict, out: Path) -> list[Path]:
    """``usage-FIELD.png`` (share of each group's assignments per expert, per MoE layer; uniform
    is 1/E), ``coactivation.png`` (P(j chosen | i chosen)) and ``saturation.png``."""
    plt = _pyplot()
    written = []
    layers, E = report["layers"], report["experts"]
    for field, values in report["groups"].items():
        names = sorted(values)
        fig, axes = _grid(plt, len(layers), f"expert usage by {field} (uniform = 1/{E})",
                          (3 + 0.25 * E, 1 + 0.3 * len(names)))  # fmt: skip
        for i, (ax, layer) in enumerate(zip(axes, layers, strict=True)):
            matrix = np.array([values[v][i] for v in names])
            _heatmap(fig, ax, matrix, names, f"layer {layer}", vmax=max(matrix.max(), 1e-9))
        fig.tight_layout()
        written.append(out / f"usage-{field}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if report["top_k"] > 1:
        fig, axes = _grid(plt, len(layers), "co-activation: P(expert j | expert i chosen)",
                          (3 + 0.25 * E, 2.5 + 0.25 * E))  # fmt: skip
        for ax, layer, matrix in zip(axes, layers, report["coactivation"], strict=True):
            _heatmap(fig, ax, np.array(matrix), [str(e) for e in range(E)], f"layer {layer}", 1.0)
            ax.set_ylabel("expert i")
        fig.tight_layout()
        written.append(out / "coactivation.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    sat = report["saturation"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sat["steps"], sat["values"], "o-")
    ax.set(xlabel="checkpoint step", ylabel="share of final top-k already chosen",
           title="router saturation", ylim=(0, 1.05))  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "saturation.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
