"""Plots of a comparison: loss against training FLOPs, loss per group, scaling fits (matplotlib,
no display needed)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_compare", "plot_scaling"]


def plot_compare(records: list[dict], out_dir: Path) -> None:
    """``loss_vs_flops.png`` (training loss curves and final validation losses against training
    FLOPs, one colour per variant) and ``groups.png`` (validation loss per group value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dict.fromkeys(r["name"] for r in records))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(names):
        rs = [r for r in records if r["name"] == name]
        color = f"C{i}"
        if rs[0]["curve"]:
            ax.plot(*zip(*rs[0]["curve"], strict=True), color=color, alpha=0.5, linewidth=1)
        ax.plot(
            [r["train_flops"] for r in rs],
            [r["valid_loss"] for r in rs],
            "o",
            color=color,
            label=f"{name} (valid)",
        )
    ax.set(xlabel="training FLOPs", ylabel="loss (nats/token)", xscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_vs_flops.png", dpi=120)
    plt.close(fig)

    keys = sorted({(f, g) for r in records for f, v in r["groups"].items() for g in v})
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(keys) * len(names) / 2), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rs = [r for r in records if r["name"] == name]
        means = [np.mean([r["groups"][f][g] for r in rs]) for f, g in keys]
        ax.bar(np.arange(len(keys)) + i * width, means, width, label=name)
    ax.set_xticks(
        np.arange(len(keys)) + 0.4 - width / 2,
        [f"{f}={g}" for f, g in keys],
        rotation=60,
        ha="right",
        fontsize=7,
    )
    ax.set(ylabel="validation loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "groups.png", dpi=120)
    plt.close(fig)


def plot_scaling(records: list[dict], fits: dict[str, dict], out: Path) -> Path:
    """Validation loss against training FLOPs with each variant's fitted ``E + A C^-gamma``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, f) in enumerate(fits.items()):
        rs = [r for r in records if r["name"] == name]
        c = np.array([r["train_flops"] for r in rs])
        ax.plot(c, [r["valid_loss"] for r in rs], "o", color=f"C{i}", label=name)
        grid = np.geomspace(c.min(), c.max() * 4, 50)
        ax.plot(grid, f["E"] + f["A"] * grid ** (-f["gamma"]), "-", color=f"C{i}", alpha=0.6)
    ax.set(xlabel="training FLOPs", ylabel="validation loss", xscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
