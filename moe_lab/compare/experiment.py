"""``moe-lab compare``: every variant trained to one training-FLOP budget, one report.

An experiment file names a budget, seeds, a ``base`` moe_lab config shared by every variant (model,
data, training recipe) and the variants, each a family plus its own ``key=value`` overrides::

    name: default
    budget: {train_flops: 2.0e12}
    seeds: [0]
    base: {model: {...}, data: {...}, train: {batch_size: 16, seq_len: 128}}
    variants:
      - {name: dense, family: dense}
      - {name: moe-8x2, family: moe, overrides: [model.moe.num_experts=8, model.moe.top_k=2]}
      - {name: cbtm-4, family: cbtm, k: 4}
      - {name: random-4, family: cbtm, k: 4, random_clusters: true}

Families: ``dense`` and ``moe`` (one run of ``train.max_flops`` = the budget), ``cbtm`` (C-BTM:
``seed_share`` of the budget on a seed, tf-idf balanced k-means into k clusters, k experts branched
from the seed share the rest; evaluated as an ensemble routed by the document prefix, or uniformly
for the random-cluster ablation; ``merge: average`` evaluates the experts' parameter average
instead, ``merge: btx`` merges them into one MoE trained for ``finetune_share`` of the budget),
``xelm`` (X-ELM's first round, :mod:`moe_lab.families.xelm`, routed by language; ``xelm.*``
overrides) and ``ifc`` (an information-flow-control model, :mod:`moe_lab.families.ifc`, evaluated by
a principal who may use every domain; ``ifc.*`` overrides). Any moe_lab config is a ``dense`` or
``moe`` variant with overrides. Every variant's token count follows from the budget through
:mod:`moe_lab.accounting`; before anything trains, each variant's achievable FLOPs are checked to
lie within 1% of the budget, and variants that change the tokenizer or the evaluation data are
refused. Each (variant, seed) is an independent resumable job under ``dir/variants/<name>/seed<s>``
whose ``result.json`` marks it finished: an interrupted compare redoes nothing that finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe_lab.config import Config, ConfigError, load_config
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
    train_flops: float = MISSING


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
    base: dict[str, Any] = field(default_factory=dict)  # a moe_lab config shared by all variants
    variants: list[VariantConfig] = field(default_factory=list)


def load_experiment(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read an experiment file with ``key=value`` overrides (``budget.train_flops=1e12``)."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"experiment file {str(path)!r} does not exist")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(ExperimentConfig),
            OmegaConf.load(path) if path else OmegaConf.create(),
            OmegaConf.from_dotlist(list(overrides)),
        )
        exp = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise ConfigError(f"{key}{str(e.msg).splitlines()[0]}") from None
    if not exp.variants:
        raise ConfigError("the experiment lists no variants")
    if not exp.seeds:
        raise ConfigError("seeds: list at least one seed")
    if not exp.budget.train_flops > 0:
        raise ConfigError(f"budget.train_flops must be positive, got {exp.budget.train_flops}")
    names = [v.name for v in exp.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names must be unique: {names}")
    for v in exp.variants:
        if v.family not in FAMILIES:
            raise ConfigError(
                f"variant {v.name!r}: unknown family {v.family!r}; known: {', '.join(FAMILIES)}"
            )
    return exp


def variant_config(exp: ExperimentConfig, variant: VariantConfig, seed: int, job: Path) -> Config:
    """The resolved moe_lab config of one (variant, seed) job, its budget the experiment's."""
    bad = [o for o in variant.overrides if o.split("=")[0].strip().startswith("train.max_")]
    if bad:
        raise ConfigError(f"variant {variant.name!r}: the budget is the experiment's, not {bad}")
    base = Path(exp.dir) / "base.yaml"  # the shared part, as a file load_config can read
    base.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(exp.base), base)
    budget = ["train.max_steps=null", "train.max_tokens=null"]
    budget.append(f"train.max_flops={exp.budget.train_flops}")
    extra = [*variant.overrides, *budget, f"run.seed={seed}", f"run.dir={job / 'run'}"]
    cfg = load_config(base, extra)
    get_family(variant.family).check_moe(cfg, variant)
    return cfg
