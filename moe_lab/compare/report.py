"""The comparison's report for people: one row per variant, mean ± std over seeds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moe_lab.compare.experiment import ExperimentConfig
from moe_lab.compare.summary import (
    conclusions,
    group_columns,
    nd_section,
    routing_section,
    scaling_section,
    significance_section,
    wsd_section,
)

__all__ = ["report_markdown"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def report_markdown(
    exp: ExperimentConfig,
    records: list[dict],
    study: dict | None = None,
    references: list[dict] = (),
    nd: dict | None = None,
) -> str:
    """The report for people: what was found first, then per budget one row per variant (mean ±
    std over seeds, best in bold), the paired tests against the baseline and the scaling fits;
    ``references``: under ``budget.schedule=wsd``, cosine runs to set the WSD losses against;
    ``nd``: the ``L(N, D)`` fits of families whose variants differ in size."""
    study = study or {}
    tolerance = exp.budget.tolerance
    within = all(abs(r["flops_vs_budget"] - 1) <= tolerance for r in records)
    budgets = ", ".join(f"{b:.4g}" for b in exp.budgets)
    lines = [f"# {exp.name}", "", *conclusions(exp, records, study), ""]
    lines += [
        f"Budgets: {budgets} training FLOPs per variant; seeds {exp.seeds}. Every variant's "
        f"achieved training FLOPs {'lie' if within else 'do NOT all lie'} within "
        f"{tolerance:.0%} of the budget. Losses in nats per token"
        + (" (mean ± std over seeds)" if len(exp.seeds) > 1 else "")
        + ", lower is better"
        + (f"; {exp.fewshot.shots}-shot accuracies, higher" if exp.fewshot.tasks else "")
        + "; the best of each column in bold.",
        "",
    ]
    for budget in exp.budgets:
        if len(exp.budgets) > 1:
            lines += [f"## {budget:.4g} training FLOPs", ""]
        lines += _table(exp, [r for r in records if r["budget_flops"] == budget]) + [""]
    lines += significance_section(exp, records) if len(exp.variants) > 1 else []
    lines += scaling_section(exp, study)
    lines += nd_section(nd or {})
    lines += routing_section(exp, records)
    lines += wsd_section(exp, records, references)
    lines += [
        "![validation loss against training FLOPs](loss_vs_flops.png)",
        "",
        f"![loss per group, minus {exp.baseline_name}'s](groups.png)",
    ]
    return "\n".join(lines) + "\n"


def _inference(rs: list[dict]) -> str:
    """Nominal inference FLOPs per token, and the measured ones where they differ (an ensemble
    whose routing shifts within documents runs more experts than its k)."""
    nominal = rs[0]["inference_flops_per_token"]
    measured = np.mean([r.get("measured_inference_flops_per_token", nominal) for r in rs])
    return f"{nominal:.4g}" + (f" ({measured:.4g})" if abs(measured / nominal - 1) > 1e-3 else "")


def _table(exp: ExperimentConfig, records: list[dict]) -> list[str]:
    names = [v.name for v in exp.variants]
    by_name = {n: [r for r in records if r["name"] == n] for n in names}
    groups, hidden = group_columns(records)
    metrics = [
        ("valid loss", lambda r: r["valid_loss"]),
        ("bits/byte", lambda r: r["bits_per_byte"]),
    ]
    metrics += [
        (f"{f}={g}", lambda r, f=f, g=g: r["groups"].get(f, {}).get(g, math.nan)) for f, g in groups
    ]
    if exp.knn.enabled:  # on the half of the validation documents kNN-LM was not tuned on
        metrics += [
            (f"{name} (half)", lambda r, key=key: r.get("knn", {}).get(key, math.nan))
            for name, key in (("LM loss", "lm_loss"), ("kNN-LM loss", "knn_loss"))
        ]
    n_losses = len(metrics)  # lower is better; the accuracies after them: higher is better
    metrics += [
        (
            f"{Path(t).stem} {a}",
            lambda r, t=t, a=a: r.get("fewshot", {}).get(t, {}).get(a, math.nan),
        )
        for t in exp.fewshot.tasks
        for a in ("acc", "acc_norm")
    ]
    means = {n: {m: _mean_std([fn(r) for r in by_name[n]]) for m, fn in metrics} for n in names}
    best = {}
    for i, (m, _) in enumerate(metrics):
        sign = 1 if i < n_losses else -1
        best[m] = min(names, key=lambda n: np.nan_to_num(sign * means[n][m][0], nan=np.inf))
    mfu = any("mfu" in r for r in records)  # GPU runs: the devices' peak is known
    lines = [
        "| variant | family | params (total / active) | train FLOPs (× budget) | tokens | "
        "inference FLOPs/token (measured) | train s | eval s | tokens/s | "
        + ("MFU | " if mfu else "")
        + " | ".join(m for m, _ in metrics)
        + " |",
        "|---" * (9 + mfu + len(metrics)) + "|",
    ]
    for n in names:
        rs = by_name[n]
        r0 = rs[0]
        cells = []
        for m, _ in metrics:
            mean, std = means[n][m]
            text = f"{mean:.4f} ± {std:.4f}" if len(rs) > 1 else f"{mean:.4f}"
            text = "–" if math.isnan(mean) else text
            cells.append(f"**{text}**" if best[m] == n else text)
        ratio = np.mean([r["flops_vs_budget"] for r in rs])
        lines.append(
            f"| [{n}]({r0['config']}) | {r0['family']} | "
            f"{r0['total_params'] / 1e6:.2f}M / {r0['active_params'] / 1e6:.2f}M | "
            f"{np.mean([r['train_flops'] for r in rs]):.4g} ({ratio:.4f}) | "
            f"{int(np.mean([r['tokens'] for r in rs])):,d} | "
            f"{_inference(rs)} | {np.mean([r['train_s'] for r in rs]):.0f} | "
            f"{np.mean([r.get('eval_s', math.nan) for r in rs]):.0f} | "
            f"{np.mean([r['tokens_per_s'] for r in rs]):,.0f} | "
            + (f"{np.mean([r.get('mfu', math.nan) for r in rs]):.1%} | " if mfu else "")
            + " | ".join(cells)
            + " |"
        )
    if hidden:
        more = ", ".join(f"{n} more of {f}" for f, n in hidden.items())
        lines += ["", f"Columns: the group values with the most validation tokens; {more} in "
                  "results.json."]  # fmt: skip
    return lines
