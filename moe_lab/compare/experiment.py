"""The experiment file of ``moe-lab compare``: budgets, seeds, a shared base config, variants.

An experiment names one budget or a sweep of them, seeds, a ``base`` moe_lab config shared by
every variant (model, data, training recipe) and the variants, each a family (see
:mod:`moe_lab.families.registry`) plus its own ``key=value`` overrides::

    name: default
    budget: {train_flops: 2.0e12}  # or {sweep: [...]}, or {start: 1e12, factor: 2, count: 4}
    seeds: [0]
    base: {model: {...}, data: {...}, train: {batch_size: 16, seq_len: 128}}
    variants:
      - {name: dense, family: dense}
      - {name: moe-8x2, family: moe, overrides: [model.moe.num_experts=8, model.moe.top_k=2]}
      - {name: cbtm-4, family: cbtm, k: 4}
      - {name: random-4, family: cbtm, k: 4, random_clusters: true}

Every variant's token count follows from each budget through :mod:`moe_lab.budget`; before
anything trains, each variant's achievable FLOPs are checked to lie within ``budget.tolerance`` of
every budget, and variants that change the tokenizer or the evaluation data are refused
(:mod:`moe_lab.compare.plan`).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from moe_lab.config import Config, ConfigError, load_config
from moe_lab.config.load import read_yaml_mapping, suggest_key
from moe_lab.families.base import VariantConfig
from moe_lab.families.registry import FAMILIES, get_family

__all__ = [
    "BudgetConfig",
    "ExperimentConfig",
    "FewshotConfig",
    "KnnConfig",
    "VariantConfig",
    "load_experiment",
    "variant_config",
]


@dataclass
class BudgetConfig:
    """The training FLOPs every variant gets: one budget, or a sweep of them (a scaling study)."""

    train_flops: float | None = None  # one budget
    sweep: list[float] = field(default_factory=list)  # several budgets: every variant at each
    start: float | None = None  # or a geometric sweep: start * factor**i, i < count
    factor: float = 2.0
    count: int | None = None
    # how far a variant's FLOPs in whole optimizer steps may fall from each budget; the records
    # and fits use the FLOPs reached, so a looser tolerance costs precision, not honesty
    tolerance: float = 0.01
    # cosine: one run per budget | wsd: per variant and seed one constant-LR trunk, and per budget
    # a decay (train.decay_fraction of its steps) branched from it (dense and MoE variants)
    schedule: str = "cosine"
    # schedule=wsd: also train ordinary cosine runs (first seed) at this many of the smallest
    # budgets, so the report can say how far the WSD losses sit from them
    wsd_reference: int = 2

    def values(self) -> list[float]:
        """The budgets, ascending; a :class:`ConfigError` unless exactly one form is set."""
        forms = [self.train_flops is not None, bool(self.sweep), self.start is not None]
        if sum(forms) != 1:
            raise ConfigError(
                "set one of budget.train_flops, budget.sweep or budget.start (with budget.count)"
            )
        if self.start is not None:
            if not (isinstance(self.count, int) and self.count >= 1 and self.factor > 1):
                raise ConfigError(
                    f"budget.start needs budget.count >= 1 and budget.factor > 1; got "
                    f"count={self.count}, factor={self.factor}"
                )
            values = [self.start * self.factor**i for i in range(self.count)]
        else:
            values = [self.train_flops] if self.train_flops is not None else list(self.sweep)
        if not 0 < self.tolerance < 0.5:
            raise ConfigError(f"budget.tolerance must be in (0, 0.5), got {self.tolerance}")
        bad = [v for v in values if not (v > 0 and math.isfinite(v))]
        if bad:
            raise ConfigError(f"budgets must be positive and finite, got {bad}")
        if len(set(values)) != len(values):
            raise ConfigError(f"budget.sweep repeats a budget: {values}")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"budget.schedule must be cosine or wsd, got {self.schedule!r}")
        return sorted(values)


@dataclass
class FewshotConfig:
    """Few-shot multiple-choice tasks every variant is scored on (moe_lab.eval.fewshot)."""

    tasks: list[str] = field(default_factory=list)  # jsonl files, or corpus-cloze(-easy)
    shots: int = 0
    limit: int | None = None  # score the first N items of each task; None = all


@dataclass
class KnnConfig:
    """A kNN-LM datastore of each single-model variant's training data (moe_lab.eval.knnlm)."""

    enabled: bool = False
    index: str = "flat"  # flat | ivfpq
    key_type: str = "ffn_input"  # ffn_input (Khandelwal et al.) | final


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    dir: str = "runs/compare"
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    # a moe_lab config shared by all variants; a finished job is never resumed, so by default
    # its checkpoints drop their optimizer states (two thirds of their size)
    base: dict[str, Any] = field(default_factory=lambda: {"train": {"keep_optimizer": False}})
    variants: list[VariantConfig] = field(default_factory=list)
    baseline: str | None = None  # the variant the others are tested against; None = the first

    @property
    def budgets(self) -> list[float]:
        return self.budget.values()

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.variants[0].name

    def job_dir(self, name: str, budget: float, seed: int) -> Path:
        """Where one (variant, budget, seed) job lives; one budget keeps the layout without it."""
        variant = Path(self.dir) / "variants" / name
        if len(self.budgets) > 1:
            variant = variant / f"flops{budget:.4g}"
        return variant / f"seed{seed}"


def load_experiment(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read an experiment file with ``key=value`` overrides (``budget.train_flops=1e12``); a run
    config key (``data.train_files=[...]``) is shorthand for the same key under ``base``."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"experiment file {str(path)!r} does not exist")
    sections = {f.name for f in dataclasses.fields(Config)}
    overrides = [f"base.{o}" if o.split(".")[0].split("=")[0] in sections else o for o in overrides]
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(ExperimentConfig),
            read_yaml_mapping(path) if path else OmegaConf.create(),
            OmegaConf.from_dotlist(list(overrides)),
        )
        exp = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        hint = suggest_key(ExperimentConfig, key)
        raise ConfigError(f"unknown experiment key {key!r}.{hint}") from None
    except OmegaConfBaseException as e:
        key = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise ConfigError(f"{key}{str(e.msg).splitlines()[0]}") from None
    except TypeError as e:  # OmegaConf's merge of a dict into a list: "variants.1.x=..."
        raise ConfigError(
            f"an override does not fit the experiment's structure ({e}); a variant's settings "
            "are changed in the experiment file, not with variants.<i>.<key>=..."
        ) from None
    if not exp.variants:
        raise ConfigError("the experiment lists no variants")
    if not exp.seeds:
        raise ConfigError("seeds: list at least one seed")
    exp.budget.values()  # exactly one form of budget, every one positive
    names = [v.name for v in exp.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names must be unique: {names}")
    for v in exp.variants:
        if v.family not in FAMILIES:
            raise ConfigError(
                f"variant {v.name!r}: unknown family {v.family!r}; known: {', '.join(FAMILIES)}"
            )
    if exp.baseline is not None and exp.baseline not in names:
        raise ConfigError(f"baseline {exp.baseline!r} is not a variant; variants: {names}")
    return exp


def variant_config(
    exp: ExperimentConfig, variant: VariantConfig, seed: int, job: Path, budget: float
) -> Config:
    """The resolved moe_lab config of one (variant, budget, seed) job."""
    bad = [o for o in variant.overrides if o.split("=")[0].strip().startswith("train.max_")]
    if bad:
        raise ConfigError(f"variant {variant.name!r}: the budget is the experiment's, not {bad}")
    limits = ["train.max_steps=null", "train.max_tokens=null", f"train.max_flops={budget}"]
    extra = [*variant.overrides, *limits, f"run.seed={seed}", f"run.dir={job / 'run'}"]
    with tempfile.TemporaryDirectory() as tmp:  # nothing is left behind when a plan is refused
        base = Path(tmp) / "base.yaml"  # the shared part, as a file load_config can read
        OmegaConf.save(OmegaConf.create(exp.base), base)
        cfg = load_config(base, extra)
    get_family(variant.family).check_moe(cfg, variant)
    return cfg
