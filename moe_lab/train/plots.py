"""Plots of a run directory, written next to its data (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from moe_lab.store.metrics import read_metrics

__all__ = ["plot_loss_curve"]


def plot_loss_curve(run_dir: Path) -> Path:
    """Write ``loss.png``: training loss per step, and validation loss where logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="valid")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
