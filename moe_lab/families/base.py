"""The protocol every experiment family implements, and what the families share.

A :class:`Family` says how a variant of it trains to a budget — its :meth:`~Family.phases`, each
a config, a share of the budget and a count of runs — runs them (:meth:`~Family.run`), and
returns one result record: what the trained artefact costs (from :mod:`moe_lab.accounting`), the
FLOPs and tokens it trained on, its loss curve, how to load it for scoring, and its validation
losses. ``moe-lab compare`` knows this protocol, not the families (see
:mod:`moe_lab.families.registry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from moe_lab.accounting import ComputeEstimate
from moe_lab.budget import Phase
from moe_lab.config import Config, ConfigError
from moe_lab.store.checkpoint import read_json
from moe_lab.store.metrics import read_metrics

__all__ = ["Family", "VariantConfig", "chained", "curve", "result"]


@dataclass
class VariantConfig:
    """One variant of an experiment: a family, its options, and changes to the base config."""

    name: str = MISSING
    family: str = "dense"  # a key of moe_lab.families.registry.FAMILIES
    overrides: list[str] = field(default_factory=list)  # key=value changes to the base config
    k: int = 4  # cbtm: clusters, one expert each
    seed_share: float = 0.25  # cbtm: share of the budget spent on the seed
    top_k: int | None = None  # cbtm: experts mixed per token; None = all k
    random_clusters: bool = False  # cbtm: the random-cluster ablation (uniform mixing)
    # cbtm: none (an ensemble) | average (one model, the experts' parameters averaged: BTM) |
    # btx (Branch-Train-MiX: the experts' FFNs become one MoE, trained for `finetune_share`)
    merge: str = "none"
    finetune_share: float = 0.1
    # cbtm, merge=btx: the router starts random (BTX) or from data (FlexOlmo): row e of each
    # layer is the mean input of that layer's FFN in expert e over e's training documents
    router_init: str = "random"


class Family:
    """An experiment family. Subclasses set :attr:`name` and implement :meth:`run`."""

    name: str = ""

    def uses_moe(self, cfg: Config) -> bool:
        """Whether the variant's model config must have MoE layers (else must not)."""
        return False

    def check(self, cfg: Config, v: VariantConfig) -> None:
        """Refuse, with a :class:`ConfigError`, options this family cannot compare fairly."""

    def phases(self, cfg: Config, v: VariantConfig) -> list[Phase]:
        """The variant's training runs and their shares of the budget (default: one run)."""
        return [Phase(cfg, 1.0, 1)]

    def run(self, cfg: Config, v: VariantConfig, budget: float, job: Path) -> dict:
        """Train the variant for ``budget`` FLOPs in ``job`` and return its :func:`result`."""
        raise NotImplementedError

    def check_moe(self, cfg: Config, v: VariantConfig) -> None:
        needs_moe = self.uses_moe(cfg)
        if needs_moe and cfg.model.moe is None:
            raise ConfigError(f"variant {v.name!r} ({v.family}) sets no model.moe.* override")
        if not needs_moe and cfg.model.moe is not None:
            raise ConfigError(f"variant {v.name!r} (family {v.family}) has MoE layers")


def curve(metrics: Path, offset: float) -> list[tuple[float, float]]:
    """(training FLOPs, loss) of every step in a ``metrics.jsonl``, FLOPs shifted by ``offset``."""
    return [(offset + r["flops"], r["loss"]) for r in read_metrics(metrics) if "loss" in r]


def chained(run_dirs: list[Path]) -> dict:
    """Training-loss curves of several runs laid end to end, and their total FLOPs, tokens,
    seconds of training (summed over resumes; 0 for runs written before it was counted), seconds
    of final evaluation, and the FLOPs their devices could have done in that time (``peak``;
    NaN unless every run knew its devices' peak)."""
    c = {"curve": [], "flops": 0.0, "tokens": 0, "train_s": 0.0, "eval_s": 0.0, "peak": 0.0}
    for run in run_dirs:
        c["curve"] += curve(run / "metrics.jsonl", c["flops"])
        summary = read_json(run / "eval.json")
        c["flops"] += summary["flops"]
        c["tokens"] += summary["tokens"]
        c["train_s"] += summary.get("wall_s", 0.0)
        c["eval_s"] += summary.get("eval_s", 0.0)
        c["peak"] += summary.get("peak_flops", math.nan) * summary.get("wall_s", 0.0)
    return c


def result(
    cost: ComputeEstimate,
    runs: list[Path],
    valid: dict,
    scorer: dict,
    eval_s: float = 0.0,
) -> dict:
    """The record of a trained variant: its cost, the FLOPs, tokens and loss curve of ``runs``
    (in training order), ``scorer`` (the arguments of :func:`moe_lab.families.loading.load_scorer`)
    and its validation losses (``evaluate``'s result). ``eval_s``: seconds of evaluation beyond
    the runs' own final ones (an ensemble's)."""
    c = chained(runs)
    return {
        "total_params": cost.total_params,
        "active_params": cost.active_params,
        "train_flops": c["flops"],
        "tokens": c["tokens"],
        "inference_flops_per_token": cost.inference_flops_per_token,
        "train_s": c["train_s"],
        "eval_s": c["eval_s"] + eval_s,
        # model FLOPs utilisation over the variant's runs, where the devices' peak is known
        **({"mfu": c["flops"] / c["peak"]} if c["peak"] > 0 else {}),
        "curve": c["curve"],
        "scorer": scorer,
        "valid_loss": valid["overall"]["loss"],
        "bits_per_byte": valid["overall"]["bits_per_byte"],
        "groups": {
            f: {g: m["loss"] for g, m in values.items()} for f, values in valid["groups"].items()
        },
        "group_tokens": {
            f: {g: m["tokens"] for g, m in values.items()} for f, values in valid["groups"].items()
        },
        # an MoE's or an ensemble's routing: each expert's share, per layer and group value
        **({"routing": valid["routing"]} if "routing" in valid else {}),
        # an ensemble's inference FLOPs per token as spent in its evaluation: experts that a
        # shifting route brings in cost more than the nominal k
        "measured_inference_flops_per_token": valid.get("inference", {}).get(
            "flops_per_token", cost.inference_flops_per_token
        ),
    }
