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
``xelm`` (X-ELM's first round, :mod:`moe_lab.xelm`, routed by language; ``xelm.*`` overrides) and
``ifc`` (an information-flow-control model, :mod:`moe_lab.ifc`, evaluated by a principal who may
use every domain; ``ifc.*`` overrides). Any moe_lab config is a ``dense`` or ``moe`` variant with
overrides. Every variant's token count follows from the budget through :mod:`moe_lab.accounting`;
before anything trains, each variant's achievable FLOPs are checked to lie within 1% of the budget,
and variants that change the tokenizer or the evaluation data are refused. Each (variant, seed) is
an independent resumable job under ``dir/variants/<name>/seed<s>`` whose ``result.json`` marks it
finished: an interrupted compare redoes nothing that finished.

Outputs in ``dir``: ``results.json`` (one record per variant and seed), ``report.md`` (mean ± std
over seeds, best per column in bold, links to each variant's resolved config), ``loss_vs_flops.png``
and ``groups.png``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING, OmegaConf

from moe_lab.accounting import estimate
from moe_lab.checkpoint import write_json
from moe_lab.config import Config, ConfigError, load_config, save_config

__all__ = ["ExperimentConfig", "VariantConfig", "load_experiment", "plan", "run_compare"]

log = logging.getLogger(__name__)

FAMILIES = ("dense", "moe", "cbtm", "xelm", "ifc")
TOLERANCE = 0.01  # achieved training FLOPs must lie within 1% of the budget
# What every variant must share, so that their losses are comparable.
SHARED_DATA = (
    "train_files",
    "valid_files",
    "valid_fraction",
    "text_field",
    "group_fields",
    "include",
    "tokenizer",
    "bpe_vocab_size",
)


@dataclass
class VariantConfig:
    name: str = MISSING
    family: str = "dense"  # dense | moe | cbtm
    overrides: list[str] = field(default_factory=list)  # key=value changes to the base config
    k: int = 4  # cbtm: clusters, one expert each
    seed_share: float = 0.25  # cbtm: share of the budget spent on the seed
    top_k: int | None = None  # cbtm: experts mixed per token; None = all k
    random_clusters: bool = False  # cbtm: the random-cluster ablation (uniform mixing)
    # cbtm: none (an ensemble) | average (one model, the experts' parameters averaged: BTM) |
    # btx (Branch-Train-MiX: the experts' FFNs become one MoE, trained for `finetune_share`)
    merge: str = "none"
    finetune_share: float = 0.1


@dataclass
class BudgetConfig:
    train_flops: float = MISSING


@dataclass
class FewshotConfig:
    """Few-shot multiple-choice tasks every variant is scored on (moe_lab.fewshot)."""

    tasks: list[str] = field(default_factory=list)  # jsonl files, or corpus-cloze(-easy)
    shots: int = 0
    limit: int | None = None  # score the first N items of each task; None = all


@dataclass
class KnnConfig:
    """A kNN-LM datastore of each single-model variant's training data (moe_lab.knnlm)."""

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
    from omegaconf.errors import OmegaConfBaseException

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
    needs_moe = variant.family == "moe" or (variant.family == "ifc" and cfg.ifc.form == "moe")
    if needs_moe and cfg.model.moe is None:
        raise ConfigError(
            f"variant {variant.name!r} ({variant.family}) sets no model.moe.* override"
        )
    if not needs_moe and cfg.model.moe is not None:
        raise ConfigError(f"variant {variant.name!r} (family {variant.family}) has MoE layers")
    if variant.family == "xelm" and cfg.xelm.add:
        raise ConfigError(
            f"variant {variant.name!r}: xelm.add trains beyond the budget; compare the first "
            "round (moe-lab xelm reports added languages)"
        )
    return cfg


def _steps_flops(cfg: Config, flops: float) -> float:
    """Training FLOPs a run given ``flops`` achieves (whole steps only)."""
    from moe_lab.train import planned_steps

    t = cfg.train
    per_step = t.batch_size * t.grad_accum * t.seq_len
    per_step *= estimate(cfg.model, t.seq_len).train_flops_per_token
    steps = planned_steps(replace(cfg, train=replace(t, max_flops=flops)))
    return steps * per_step


def _phases(cfg: Config, v: VariantConfig) -> list[tuple[Config, float, int]]:
    """The training runs of a variant: (config, share of the budget, how many such runs)."""
    if v.family == "cbtm":
        if v.merge != "btx":
            return [(cfg, v.seed_share, 1), (cfg, (1 - v.seed_share) / v.k, v.k)]
        experts = (1 - v.seed_share - v.finetune_share) / v.k
        return [
            (cfg, v.seed_share, 1),
            (cfg, experts, v.k),
            (_btx_cfg(cfg, v), v.finetune_share, 1),
        ]
    if v.family == "xelm":
        from moe_lab.data import with_group_field
        from moe_lab.xelm import _plan

        groups = len(_plan(with_group_field(cfg, cfg.xelm.lang_field))["groups"])
        share = cfg.xelm.seed_share
        return [(cfg, share, 1), (cfg, (1 - share) / groups, groups)]
    if v.family == "ifc":
        from moe_lab.ifc.pipeline import _moe_model_cfg, _with_domain_field, discover_domains

        n, share = len(discover_domains(_with_domain_field(cfg))), cfg.ifc.public_share
        public = domain = cfg
        if cfg.ifc.form == "moe":  # one expert routed in the public phase, min(k, 2) after
            model = _moe_model_cfg(cfg, 1 + n)
            k = model.moe.top_k
            public = replace(cfg, model=replace(model, moe=replace(model.moe, top_k=1)))
            domain = replace(cfg, model=replace(model, moe=replace(model.moe, top_k=min(k, 2))))
        return [(public, share, 1), (domain, (1 - share) / n, n)]
    return [(cfg, 1.0, 1)]


def _btx_cfg(cfg: Config, v: VariantConfig) -> Config:
    """The config of a BTX variant's merged MoE: expert e of every layer is expert model e's FFN."""
    from moe_lab.config import MoEConfig

    top_k = min(v.top_k or 2, v.k)
    moe = MoEConfig(num_experts=v.k, top_k=top_k, expert_hidden=cfg.model.ffn_hidden)
    return replace(cfg, model=replace(cfg.model, moe=moe))


def _achievable(cfg: Config, v: VariantConfig, budget: float) -> float:
    return sum(n * _steps_flops(c, budget * share) for c, share, n in _phases(cfg, v))


def plan(exp: ExperimentConfig, out: Path) -> dict[str, dict]:
    """Per variant: its config and achievable FLOPs; refuse what cannot be compared.

    Raises:
        ConfigError: a variant that cannot fit its smallest run in the budget, misses the budget
            by more than 1%, or changes the tokenizer or evaluation data.
    """
    reference = None
    plans = {}
    for v in exp.variants:
        cfg = variant_config(exp, v, exp.seeds[0], out / "variants" / v.name / "seed0")
        data = {k: getattr(cfg.data, k) for k in SHARED_DATA}
        if reference is None:
            reference = (v.name, data)
        elif data != reference[1]:
            diff = sorted(k for k in SHARED_DATA if data[k] != reference[1][k])
            raise ConfigError(
                f"variant {v.name!r} changes data.{', data.'.join(diff)} relative to "
                f"{reference[0]!r}: every variant must share the tokenizer and evaluation data"
            )
        budget = exp.budget.train_flops
        if v.family == "cbtm" and not 0 < v.seed_share < 1:
            raise ConfigError(f"variant {v.name!r}: seed_share must be in (0, 1)")
        if v.merge not in ("none", "average", "btx"):
            raise ConfigError(f"variant {v.name!r}: merge must be none, average or btx")
        if v.merge == "btx" and not 0 < v.finetune_share < 1 - v.seed_share:
            raise ConfigError(f"variant {v.name!r}: finetune_share must be in (0, 1 - seed_share)")
        if v.family == "cbtm" and v.k < 1:
            raise ConfigError(f"variant {v.name!r}: k (clusters) must be at least 1")
        if v.family == "cbtm" and v.top_k is not None and not 1 <= v.top_k <= v.k:
            raise ConfigError(f"variant {v.name!r}: top_k must be in [1, k={v.k}] or null")
        if v.family == "xelm":
            _check_xelm_languages(cfg, v.name)
        try:
            achieved = _achievable(cfg, v, budget)
        except ConfigError as e:
            msg = f"variant {v.name!r}: its smallest run exceeds the budget ({e})"
            raise ConfigError(msg) from None
        if abs(achieved - budget) > TOLERANCE * budget:
            raise ConfigError(
                f"variant {v.name!r} can only reach {achieved:.4g} of the {budget:.4g} FLOP budget "
                f"in whole steps (more than {TOLERANCE:.0%} off): raise budget.train_flops or "
                "lower train.batch_size / seq_len"
            )
        plans[v.name] = {"config": cfg, "flops": achieved}
    return plans


def _check_xelm_languages(cfg: Config, name: str) -> None:
    """X-ELM is scored on its own languages only: in a comparison they must be all the data's."""
    from moe_lab.xelm import _first_round, _texts_by_language

    texts = _texts_by_language(cfg)
    left_out = sorted(set(texts) - set(_first_round(cfg.xelm, texts)))  # xelm.add is refused
    if left_out:
        raise ConfigError(
            f"variant {name!r}: its X-ELM experts leave out the languages {left_out}, on which "
            "the other variants would still be scored: narrow the data of every variant with "
            f"data.include.{cfg.xelm.lang_field} instead"
        )


def _eval_summary(valid: dict) -> dict:
    return {
        "valid_loss": valid["overall"]["loss"],
        "bits_per_byte": valid["overall"]["bits_per_byte"],
        "groups": {
            f: {g: m["loss"] for g, m in values.items()} for f, values in valid["groups"].items()
        },
    }


def _run_single(cfg: Config) -> dict:
    from moe_lab.train import train

    result = train(cfg)
    est = estimate(cfg.model, cfg.train.seq_len)
    valid = json.loads((result.run_dir / "eval.json").read_text())["valid"]
    return {
        "total_params": est.total_params,
        "active_params": est.active_params,
        "train_flops": result.flops,
        "tokens": result.tokens,
        "inference_flops_per_token": est.inference_flops_per_token,
        "curve": _curve(result.run_dir / "metrics.jsonl", 0.0),
        "scorer": {"run_dir": str(result.run_dir)},
        **_eval_summary(valid),
    }


def _curve(metrics: Path, offset: float) -> list[tuple[float, float]]:
    from moe_lab.metrics import read_metrics

    return [(offset + r["flops"], r["loss"]) for r in read_metrics(metrics) if "loss" in r]


def _chained(run_dirs: list[Path]) -> tuple[list[tuple[float, float]], float, int]:
    """Training-loss curves of several runs laid end to end, and their total FLOPs and tokens."""
    curve, flops, tokens = [], 0.0, 0
    for run in run_dirs:
        curve += _curve(run / "metrics.jsonl", flops)
        summary = json.loads((run / "eval.json").read_text())
        flops, tokens = flops + summary["flops"], tokens + summary["tokens"]
    return curve, flops, tokens


def _run_ifc(cfg: Config, job: Path) -> dict:
    """An IFC model (moe_lab.ifc), evaluated by a principal who may use every domain."""
    from moe_lab.ifc import AccessPolicy, load_ifc, train_ifc
    from moe_lab.ifc.experiment import evaluate_ifc

    manifest = train_ifc(cfg, job / "ifc")
    policy = AccessPolicy({"all": frozenset(manifest["domains"])})
    model = load_ifc(job / "ifc", policy, "all")
    valid = evaluate_ifc(model, cfg)
    runs = [job / "ifc" / "public" / "run"]
    runs += [job / "ifc" / "domains" / d / "run" for d in manifest["domains"]]
    curve, flops, tokens = _chained(runs)
    est = estimate(model.cfg.model, cfg.train.seq_len)
    n = len(model.experts) if model.experts is not None else 1
    return {
        "total_params": n * est.total_params,
        "active_params": n * est.active_params,
        "train_flops": flops,
        "tokens": tokens,
        "inference_flops_per_token": n * est.inference_flops_per_token,
        "curve": curve,
        "scorer": {"run_dir": str(job / "ifc"), "principal": "all", "policy": policy},
        **_eval_summary(valid),
    }


def _run_xelm(cfg: Config, job: Path) -> dict:
    """X-ELM's first round (moe_lab.xelm), routed top-1 by each document's language."""
    from moe_lab.xelm import evaluate_by_language, train_xelm

    cfg = replace(cfg, run=replace(cfg.run, dir=str(job / "xelm")))
    plan = train_xelm(cfg)
    valid = evaluate_by_language(cfg, job / "xelm")["valid"]
    runs = [job / "xelm" / "seed"] + [job / "xelm" / "experts" / n / "run" for n in plan["groups"]]
    curve, flops, tokens = _chained(runs)
    est = estimate(cfg.model, cfg.train.seq_len)
    return {
        "total_params": len(plan["groups"]) * est.total_params,
        "active_params": est.active_params,
        "train_flops": flops,
        "tokens": tokens,
        "inference_flops_per_token": est.inference_flops_per_token,
        "curve": curve,
        "scorer": {"run_dir": str(job / "xelm"), "route_by": cfg.xelm.lang_field},
        **_eval_summary(valid),
    }


def _run_cbtm(cfg: Config, v: VariantConfig, budget: float, job: Path) -> dict:
    from moe_lab.btm import train_experts
    from moe_lab.clustering.run import cluster_documents
    from moe_lab.experts.ensemble import evaluate_experts
    from moe_lab.train import train

    seed_cfg = replace(
        cfg,
        train=replace(cfg.train, max_flops=budget * v.seed_share),
        run=replace(cfg.run, dir=str(job / "seed"), resume=True),
    )
    seed = train(seed_cfg)
    clusters = job / "clusters"
    if not (clusters / "clusters.json").exists():
        method = "random" if v.random_clusters else "kmeans"
        cluster_cfg = replace(
            cfg,
            cluster=replace(cfg.cluster, k=v.k, method=method),
            run=replace(cfg.run, dir=str(clusters)),
        )
        shutil.rmtree(clusters, ignore_errors=True)  # an interrupted clustering starts over
        cluster_documents(cluster_cfg)
    shards = {
        f"c{c}": [str(clusters / "shards" / "train" / f"cluster_{c:03d}.jsonl")] for c in range(v.k)
    }
    # Each expert is validated on its cluster's share of the validation documents (all of them
    # where none fell to it): without valid_files its run would hold out part of its shard.
    valid = [clusters / "shards" / "valid" / f"cluster_{c:03d}.jsonl" for c in range(v.k)]
    every = [str(f) for f in valid if f.stat().st_size]
    valid_files = {f"c{c}": [str(f)] if f.stat().st_size else every for c, f in enumerate(valid)}
    expert_share = 1 - v.seed_share - (v.finetune_share if v.merge == "btx" else 0.0)
    template = replace(cfg, train=replace(cfg.train, max_flops=budget * expert_share))
    manifest = train_experts(
        template, shards, job / "experts", seed=seed.run_dir, valid_files=valid_files
    )
    runs = [seed.run_dir] + [job / "experts" / "experts" / n / "run" for n in manifest["experts"]]
    est = estimate(cfg.model, cfg.train.seq_len)
    if v.merge == "btx":
        merged = _train_btx(cfg, v, budget, job, runs)
        curve, flops, tokens = _chained([*runs, merged.run_dir])
        valid = json.loads((merged.run_dir / "eval.json").read_text())["valid"]
        est = estimate(_btx_cfg(cfg, v).model, cfg.train.seq_len)
        total, used = est.total_params, 1
        scorer = {"run_dir": str(merged.run_dir)}
    else:
        routing = "uniform" if v.random_clusters else "prefix"
        routing = "average" if v.merge == "average" else routing
        ens = replace(cfg.ensemble, clusters_dir=str(clusters), routing=routing, top_k=v.top_k)
        valid = evaluate_experts(job / "experts", replace(cfg, ensemble=ens))["valid"]
        curve, flops, tokens = _chained(runs)
        total = est.total_params if v.merge == "average" else v.k * est.total_params
        used = v.k if v.top_k is None or v.random_clusters else v.top_k
        used = 1 if v.merge == "average" else used
        top_k = "null" if v.top_k is None else v.top_k
        overrides = [f"ensemble.clusters_dir={clusters}", f"ensemble.routing={routing}"]
        scorer = {
            "run_dir": str(job / "experts"),
            "overrides": [*overrides, f"ensemble.top_k={top_k}"],
        }
    return {
        "total_params": total,
        "active_params": used * est.active_params,
        "train_flops": flops,
        "tokens": tokens,
        "inference_flops_per_token": used * est.inference_flops_per_token,
        "curve": curve,
        "scorer": scorer,
        **_eval_summary(valid),
    }


def _train_btx(cfg: Config, v: VariantConfig, budget: float, job: Path, runs: list[Path]):
    """Merge the experts into one MoE (:func:`moe_lab.btm.btx`) and train it, router included."""
    from moe_lab.btm import btx
    from moe_lab.checkpoint import load_run, save_checkpoint
    from moe_lab.train import train

    merged_cfg = _btx_cfg(cfg, v)
    start = job / "btx" / "merged"
    if not (start / "checkpoints").exists():
        experts = [load_run(run)[1] for run in runs[1:]]
        model = btx(experts, top_k=merged_cfg.model.moe.top_k, seed=cfg.run.seed)
        save_checkpoint(start / "checkpoints", 0, model, None, {}, 1)
        shutil.copytree(runs[0] / "tokenizer", start / "tokenizer", dirs_exist_ok=True)
    return train(
        replace(
            merged_cfg,
            train=replace(cfg.train, max_flops=budget * v.finetune_share, init_from=str(start)),
            run=replace(cfg.run, dir=str(job / "btx" / "run"), resume=True),
        )
    )


def run_variant(exp: ExperimentConfig, v: VariantConfig, seed: int, out: Path) -> dict:
    """Train and evaluate one (variant, seed); a finished job returns its saved record."""
    job = out / "variants" / v.name / f"seed{seed}"
    if (job / "result.json").exists():
        return json.loads((job / "result.json").read_text())
    log.info("variant %s (%s), seed %d: training in %s", v.name, v.family, seed, job)
    cfg = variant_config(exp, v, seed, job)
    cfg = replace(cfg, run=replace(cfg.run, resume=True))
    job.mkdir(parents=True, exist_ok=True)
    save_config(cfg, job / "config.yaml")
    started = time.perf_counter()
    if v.family == "cbtm":
        record = _run_cbtm(cfg, v, exp.budget.train_flops, job)
    elif v.family == "ifc":
        record = _run_ifc(cfg, job)
    elif v.family == "xelm":
        record = _run_xelm(cfg, job)
    else:
        record = _run_single(cfg)
    wall = time.perf_counter() - started
    scorer = record.pop("scorer", None)  # how to load the trained variant for scoring
    if exp.fewshot.tasks:
        record["fewshot"] = _fewshot(exp.fewshot, scorer, v)
    if exp.knn.enabled:
        record["knn"] = _knn(exp.knn, scorer, v)
    record = {
        "name": v.name,
        "family": v.family,
        "seed": seed,
        "config": str((job / "config.yaml").relative_to(out)),
        "budget_flops": exp.budget.train_flops,
        "flops_vs_budget": record["train_flops"] / exp.budget.train_flops,
        "wall_s": wall,
        "tokens_per_s": record["tokens"] / wall,
        **record,
    }
    write_json(job / "result.json", record)
    log.info(
        "variant %s, seed %d: valid loss %.4f in %.0f s", v.name, seed, record["valid_loss"], wall
    )
    return record


def _fewshot(fs: FewshotConfig, scorer: dict | None, v: VariantConfig) -> dict:
    """``{task: {"acc", "acc_norm", "n"}}`` of a trained variant; {} where none can be scored.

    An X-ELM variant (``route_by``) scores each item with the expert of its language, as it
    evaluates documents; its priming examples come from items of the same language.
    """
    from moe_lab.fewshot import evaluate_task, load_task
    from moe_lab.scoring import load_scorer

    if scorer is None:
        log.warning("variant %s (%s): no few-shot scoring for this family", v.name, v.family)
        return {}
    scorer = dict(scorer)
    field = scorer.pop("route_by", None)
    loaded = {}  # lang (None: not routed by language) -> Scorer, loaded once for all tasks

    def scorer_for(lang: str | None):
        if lang not in loaded:
            loaded[lang] = load_scorer(**scorer, lang=lang)
        return loaded[lang]

    results = {}
    for task in fs.tasks:
        items = load_task(task)[: fs.limit]
        if field is None:
            results[task] = evaluate_task(scorer_for(None), items, fs.shots)["overall"]
            continue
        if any(field not in r for r in items):
            raise ConfigError(f"variant {v.name!r} routes by {field!r}: task {task} lacks it")
        parts = []
        for value in sorted({r[field] for r in items}):
            subset = [r for r in items if r[field] == value]
            parts.append(evaluate_task(scorer_for(value), subset, fs.shots)["overall"])
        n = sum(p["n"] for p in parts)
        results[task] = {
            **{m: sum(p[m] * p["n"] for p in parts) / n for m in ("acc", "acc_norm")},
            "n": n,
        }
    return results


def _knn(kc: KnnConfig, scorer: dict | None, v: VariantConfig) -> dict:
    """kNN-LM of a single-model variant: tuned on half the validation documents, and the loss of
    the model with and without it on the other half; {} for ensembles and IFC models."""
    from moe_lab.checkpoint import load_run
    from moe_lab.evaluate import validation_store
    from moe_lab.knnlm.run import build_run_datastore, evaluate_run_knn

    if scorer is None or set(scorer) != {"run_dir"}:
        log.warning("variant %s (%s): no kNN-LM for this family", v.name, v.family)
        return {}
    run = scorer["run_dir"]
    build_run_datastore(run, kc.index, kc.key_type)
    cfg, model, tokenizer = load_run(run)
    store = validation_store(cfg, tokenizer)
    knn = evaluate_run_knn(run, model, tokenizer, store, cfg.train.seq_len, cfg.train.eval_batch)
    return {
        **{k: knn["tuned"][k] for k in ("lambda", "temperature", "k")},
        "lm_loss": knn["lm"]["overall"]["loss"],
        "knn_loss": knn["knn"]["overall"]["loss"],
    }


def run_compare(exp: ExperimentConfig) -> list[dict]:
    """Plan (refusing what cannot be compared), run every job, write the report and plots."""
    from moe_lab.plots import plot_compare

    out = Path(exp.dir)
    plan(exp, out)
    records = [run_variant(exp, v, s, out) for v in exp.variants for s in exp.seeds]
    (out / "results.json").write_text(json.dumps(records, indent=2))
    (out / "report.md").write_text(report_markdown(exp, records))
    plot_compare(records, out)
    return records


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def report_markdown(exp: ExperimentConfig, records: list[dict]) -> str:
    """The report for people: one row per variant, mean ± std over seeds, best loss in bold."""
    names = [v.name for v in exp.variants]
    by_name = {n: [r for r in records if r["name"] == n] for n in names}
    groups = sorted({(f, g) for r in records for f, values in r["groups"].items() for g in values})
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
    within = all(abs(r["flops_vs_budget"] - 1) <= TOLERANCE for r in records)
    lines = [
        f"# {exp.name}",
        "",
        f"Budget: {exp.budget.train_flops:.4g} training FLOPs per variant; seeds {exp.seeds}. "
        f"Every variant's achieved training FLOPs {'lie' if within else 'do NOT all lie'} within "
        f"{TOLERANCE:.0%} of the budget. Losses in nats per token (mean ± std over seeds), lower "
        "is better"
        + (f"; {exp.fewshot.shots}-shot accuracies, higher" if exp.fewshot.tasks else "")
        + "; the best of each column in bold.",
        "",
        "| variant | family | params (total / active) | train FLOPs (× budget) | tokens | "
        "inference FLOPs/token | wall s | tokens/s | " + " | ".join(m for m, _ in metrics) + " |",
        "|---" * (8 + len(metrics)) + "|",
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
            f"{r0['inference_flops_per_token']:.4g} | {np.mean([r['wall_s'] for r in rs]):.0f} | "
            f"{np.mean([r['tokens_per_s'] for r in rs]):,.0f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "![loss against training FLOPs](loss_vs_flops.png)",
        "",
        "![per group](groups.png)",
    ]
    return "\n".join(lines) + "\n"


def fit_scaling(records: list[dict]) -> dict:
    """Fit ``L(C) = E + A * C^-gamma`` to (training FLOPs, validation loss) of one family.

    Needs at least 3 distinct budgets; returns ``{"E", "A", "gamma", "rmse"}``.
    """
    from scipy.optimize import curve_fit

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
