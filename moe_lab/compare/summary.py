"""What a comparison found, in the sentences a researcher would write, and the tables behind
them: each variant against the baseline at every budget (paired over seeds), and over a sweep the
fitted curves, their predictions and where they cross the baseline's; what the routers did."""

from __future__ import annotations

import math

from moe_lab.compare.experiment import ExperimentConfig
from moe_lab.compare.scaling import budget_of
from moe_lab.compare.stats import LEVEL, significance

__all__ = [
    "conclusions",
    "group_columns",
    "nd_section",
    "routing_section",
    "routings",
    "scaling_section",
    "significance_section",
    "wsd_section",
]


MAX_GROUP_VALUES = 16  # per group field in the tables and heatmap; results.json keeps them all


def group_columns(records: list[dict]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """The (field, value) pairs the report and heatmap show: every value of a field with up to
    16, else the 16 with the most validation tokens (records from before ``group_tokens`` was
    kept: the first 16 in order); and per field how many values were left out."""
    shown, hidden = [], {}
    fields = dict.fromkeys(f for r in records for f in r["groups"])
    for f in fields:
        values = sorted({g for r in records for g in r["groups"].get(f, {})})
        tokens = {g: max(r.get("group_tokens", {}).get(f, {}).get(g, 0) for r in records)
                  for g in values}  # fmt: skip
        kept = sorted(values, key=lambda g: -tokens[g])[:MAX_GROUP_VALUES]
        shown += [(f, g) for g in values if g in kept]
        if len(values) > len(kept):
            hidden[f] = len(values) - len(kept)
    return shown, hidden


def _ci(d: dict) -> str:
    if d["n"] == 1:
        return f"{d['mean']:+.4f} (1 seed)"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def conclusions(exp: ExperimentConfig, records: list[dict], study: dict) -> list[str]:
    """One sentence per variant: how it fares against the baseline at the largest budget and,
    over a sweep, where its fitted curve is predicted to cross the baseline's."""
    base, top = exp.baseline_name, max(exp.budgets)
    lines = []
    for name, diffs in significance(records, base, top).items():
        d = diffs["overall"]
        verb = "beats" if d["mean"] < 0 else "trails"
        text = f"- **{name}** {verb} {base} by {abs(d['mean']):.4f} nats/token at {top:.3g} FLOPs"
        if d["n"] == 1:
            text += " (one seed: no significance test)."
        else:
            half = (d["high"] - d["low"]) / 2
            sig = "significant" if d["significant"] else "not significant"
            text += f" (± {half:.4f}, {LEVEL:.0%} CI over {d['n']} seeds: {sig}, p = {d['p']:.2g})."
        cross = study.get(name, {}).get("crossover")
        if cross is not None:
            high = cross["searched"][1]
            if cross["flops"] is None:
                text += f" Its fitted curve does not cross {base}'s up to {high:.3g} FLOPs"
            else:
                low_c, high_c = cross["interval"]
                text += (
                    f" Its fitted curve crosses {base}'s at {cross['flops']:.3g} FLOPs "
                    f"(95% bootstrap interval [{low_c:.3g}, {high_c:.3g}])"
                )
            text += f"; {cross['share']:.0%} of bootstrap resamples cross below {high:.3g}."
        lines.append(text.replace("**", ""))  # bold marks the tables' best values only
    return lines


def significance_section(exp: ExperimentConfig, records: list[dict]) -> list[str]:
    """Per budget: each variant minus the baseline, validation loss, paired over seeds."""
    base = exp.baseline_name
    lines = [
        f"## Against {base}",
        "",
        f"Validation loss minus {base}'s, paired by seed (negative: lower loss), mean and "
        f"{LEVEL:.0%} t interval; the group values where the interval excludes 0.",
        "",
        "| budget | variant | Δ loss [CI] | p | significant | groups lower / higher |",
        "|---|---|---|---|---|---|",
    ]
    for budget in exp.budgets:
        for name, diffs in significance(records, base, budget).items():
            d = diffs["overall"]
            sig_groups = {k: v for k, v in diffs.items() if k != "overall" and v["significant"]}
            lower = [k for k, v in sig_groups.items() if v["mean"] < 0]
            higher = [k for k, v in sig_groups.items() if v["mean"] > 0]
            p = "–" if math.isnan(d["p"]) else f"{d['p']:.2g}"
            groups = f"{', '.join(lower) or '–'} / {', '.join(higher) or '–'}"
            yes = "yes" if d["significant"] else "no"
            lines.append(f"| {budget:.3g} | {name} | {_ci(d)} | {p} | {yes} | {groups} |")
    return [*lines, ""]


def scaling_section(exp: ExperimentConfig, study: dict) -> list[str]:
    """The fitted ``L(C) = E + A C^-gamma`` per variant, predictions and crossovers."""
    if not study:
        return []
    base = exp.baseline_name
    lines = [
        "## Scaling fits",
        "",
        "`L(C) = E + A·C^-γ` per variant over every budget and seed; 95% bootstrap intervals "
        "(seeds resampled at each budget).",
        "",
        "| variant | E [CI] | γ [CI] | rmse | L at 10× [CI] | L at 100× [CI] | "
        f"crosses {base} at |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in study.items():
        f, iv = s["fit"], s["intervals"]
        cells = [
            f"{f['E']:.4f} [{iv['E'][0]:.3f}, {iv['E'][1]:.3f}]",
            f"{f['gamma']:.3f} [{iv['gamma'][0]:.3f}, {iv['gamma'][1]:.3f}]",
            f"{f['rmse']:.4f}",
        ]
        for x in ("10x", "100x"):
            p = s["predicted"][x]
            cells.append(f"{p['loss']:.4f} [{p['interval'][0]:.3f}, {p['interval'][1]:.3f}]")
        cross = s.get("crossover")
        if cross is None:
            cells.append("–")
        elif cross["flops"] is None:
            cells.append(f"none up to {cross['searched'][1]:.3g}")
        else:
            lo, hi = cross["interval"]
            cells.append(f"{cross['flops']:.3g} [{lo:.3g}, {hi:.3g}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def nd_section(nd: dict) -> list[str]:
    """Per family with variants of several sizes: the fitted ``L(N, D)`` and the compute-optimal
    size (:mod:`moe_lab.compare.scaling_nd`)."""
    if not nd:
        return []
    lines = [
        "## Size and data: L(N, D)",
        "",
        "`L(N, D) = E + A·N^-α + B·D^-β` per family over its variants' sizes (N: active "
        "parameters, D: tokens), every budget and seed; 95% bootstrap intervals. The "
        "compute-optimal size at C FLOPs minimises the fitted loss under C = 6ND.",
        "",
        "| family (variants) | E [CI] | α [CI] | β [CI] | rmse | optimal N at the largest "
        "budget [CI] | at 100× [CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, s in nd.items():
        f, iv = s["fit"], s["intervals"]
        cells = [f"{f[k]:.3f} [{iv[k][0]:.3f}, {iv[k][1]:.3f}]" for k in ("E", "alpha", "beta")]
        cells.append(f"{f['rmse']:.4f}")
        for x in ("1x", "100x"):
            o = s["optimal"][x]
            lo, hi = o["params_interval"]
            cells.append(f"{o['params']:.3g} [{lo:.3g}, {hi:.3g}] at {o['flops']:.3g} FLOPs")
        lines.append(f"| {family} ({', '.join(s['variants'])}) | " + " | ".join(cells) + " |")
    return [*lines, ""]


def routings(records: list[dict]) -> tuple[float, dict[str, dict]]:
    """The largest budget and, at it, each routed variant's first seed's ``routing``."""
    top = max(budget_of(r) for r in records)
    routed: dict[str, dict] = {}
    for r in records:
        if "routing" in r and budget_of(r) == top and r["name"] not in routed:
            routed[r["name"]] = r["routing"]
    return top, routed


def routing_section(exp: ExperimentConfig, records: list[dict]) -> list[str]:
    """Per variant with routers (an MoE's token routers, an ensemble's sequence router), at the
    largest budget and the first seed: dead experts and usage entropy per router layer, and for
    each group value the expert that serves most of it in the last layer."""
    top, routed = routings(records)
    if not routed:
        return []
    lines = [
        "## Routing",
        "",
        f"At {top:.4g} training FLOPs, seed {exp.seeds[0]}: per router layer the experts below a "
        "tenth of a uniform share (dead) and the entropy of the usage (bits, of the maximum "
        "log2 E); per group value the expert serving most of it in the last layer, with its share "
        "(MoE: of the token assignments; ensembles: of the routing weight). Heatmaps: "
        "routing.png.",
        "",
        "| variant | dead experts per layer | usage entropy per layer | busiest expert per group |",
        "|---|---|---|---|",
    ]
    shown = group_columns(records)[0]
    for name, routing in routed.items():
        dead = ", ".join(str(len(layer["dead"])) for layer in routing["layers"])
        entropy = ", ".join(
            f"{layer['entropy_bits']:.2f}/{layer['max_entropy_bits']:.2f}"
            for layer in routing["layers"]
        )
        busiest = []
        for field, value in shown:
            if value in routing["groups"].get(field, {}):
                last = routing["groups"][field][value][-1]
                e = max(range(len(last)), key=last.__getitem__)
                busiest.append(f"{field}={value}: {e} ({last[e]:.0%})")
        lines.append(f"| {name} | {dead} | {entropy} | {'; '.join(busiest)} |")
    return [*lines, ""]


def wsd_section(exp: ExperimentConfig, records: list[dict], references=()) -> list[str]:
    """``budget.schedule=wsd``: what the shared trunks saved against one run per budget, and how
    far the WSD losses sit from cosine runs of the same budgets (``references``)."""
    if exp.budget.schedule != "wsd":
        return []
    lines = [
        "## Warmup-stable-decay",
        "",
        "Each variant and seed trained one constant-learning-rate trunk; each budget's model is a "
        "decay of the last `train.decay_fraction` of its steps branched from the trunk, equal to "
        "a whole WSD run of that budget and charged its FLOPs.",
        "",
        "| variant | training FLOPs spent | one run per budget would spend | saved |",
        "|---|---|---|---|",
    ]
    for v in exp.variants:
        spent = separate = 0.0
        for seed in exp.seeds:
            rs = [r for r in records if r["name"] == v.name and r["seed"] == seed]
            trunk = max(r["wsd_trunk_flops"] for r in rs)  # the trunk where the last decay began
            spent += trunk + sum(r["train_flops"] - r["wsd_trunk_flops"] for r in rs)
            separate += sum(r["train_flops"] for r in rs)
        lines.append(f"| {v.name} | {spent:.4g} | {separate:.4g} | {1 - spent / separate:.0%} |")
    if references:
        lines += [
            "",
            f"Against ordinary cosine runs of the same budgets (seed {exp.seeds[0]}; validation "
            "loss, negative: WSD lower):",
            "",
            "| budget | variant | WSD | cosine | WSD − cosine |",
            "|---|---|---|---|---|",
        ]
        for ref in references:
            (wsd,) = [r for r in records if r["name"] == ref["name"] and r["seed"] == ref["seed"]
                      and r["budget_flops"] == ref["budget_flops"]]  # fmt: skip
            lines.append(
                f"| {ref['budget_flops']:.4g} | {ref['name']} | {wsd['valid_loss']:.4f} | "
                f"{ref['valid_loss']:.4f} | {wsd['valid_loss'] - ref['valid_loss']:+.4f} |"
            )
    return [*lines, ""]
