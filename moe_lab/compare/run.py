"""Running a comparison: each (variant, seed) an independent resumable job, through the family
registry, then the report and the plots.

A job lives in ``dir/variants/<name>/seed<s>``; its ``result.json`` marks it finished, so an
interrupted compare redoes nothing that finished. Outputs in ``dir``: ``results.json`` (one record
per variant and seed), ``report.md`` (mean ± std over seeds, best per column in bold, links to each
variant's resolved config), ``loss_vs_flops.png`` and ``groups.png``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from moe_lab.budget import planned_steps
from moe_lab.compare.experiment import (
    ExperimentConfig,
    FewshotConfig,
    KnnConfig,
    VariantConfig,
    variant_config,
)
from moe_lab.compare.plan import plan
from moe_lab.compare.plots import plot_compare
from moe_lab.compare.report import report_markdown
from moe_lab.compare.scaling import scaling_study
from moe_lab.compare.scaling_nd import nd_study
from moe_lab.config import Config, ConfigError, save_config
from moe_lab.eval.evaluate import validation_store
from moe_lab.eval.fewshot import evaluate_task, load_task
from moe_lab.eval.knnlm.run import build_run_datastore, evaluate_run_knn
from moe_lab.families.loading import load_scorer
from moe_lab.families.registry import get_family
from moe_lab.store.checkpoint import (
    checkpoint_dir,
    checkpoint_step,
    find_checkpoint,
    latest_checkpoint,
    load_run,
    read_json,
    write_json,
)
from moe_lab.train.loop import train
from moe_lab.train.optim import decay_start
from moe_lab.train.run_dir import RunLock
from moe_lab.train.threads import cpu_threads

__all__ = ["run_compare", "run_variant"]

log = logging.getLogger(__name__)


def run_variant(
    exp: ExperimentConfig,
    v: VariantConfig,
    seed: int,
    budget: float | None = None,
    cosine_reference: bool = False,
) -> dict:
    """Train and evaluate one (variant, budget, seed); a finished job returns its saved record.
    ``budget`` may be left out when the experiment has one. ``cosine_reference``: under
    ``budget.schedule=wsd``, the ordinary cosine run of the same job (in ``seed<s>-cosine``)."""
    out = Path(exp.dir)
    budget = exp.budgets[0] if budget is None else budget
    job = exp.job_dir(v.name, budget, seed)
    if cosine_reference:
        job = job.with_name(f"{job.name}-cosine")
    if (job / "result.json").exists():
        return read_json(job / "result.json")
    log.info("variant %s (%s), %.3g FLOPs, seed %d: training in %s", v.name, v.family, budget,
             seed, job)  # fmt: skip
    cfg = variant_config(exp, v, seed, job, budget)
    cfg = replace(cfg, run=replace(cfg.run, resume=True))
    trunk_flops = None
    if exp.budget.schedule == "wsd" and not cosine_reference:
        cfg, trunk_flops = _wsd_branch(exp, v, seed, cfg)
    job.mkdir(parents=True, exist_ok=True)
    save_config(cfg, job / "config.yaml")
    started = time.perf_counter()
    with RunLock(job), cpu_threads(cfg.run.threads):  # one compare at a time per job
        record = get_family(v.family).run(cfg, v, budget, job)
        scorer = record.pop("scorer", None)  # how to load the trained variant for scoring
        scoring = time.perf_counter()
        if exp.fewshot.tasks:
            record["fewshot"] = _fewshot(exp.fewshot, scorer, v)
        if exp.knn.enabled:
            record["knn"] = _knn(exp.knn, scorer, v)
        record["eval_s"] += time.perf_counter() - scoring
    wall = time.perf_counter() - started
    record = {
        "name": v.name,
        "family": v.family,
        "seed": seed,
        "config": str((job / "config.yaml").relative_to(out)),
        "budget_flops": budget,
        "flops_vs_budget": record["train_flops"] / budget,
        "wall_s": wall,  # this attempt's time, evaluation included (eval_s: of it, evaluating)
        # budget.schedule=wsd: the FLOPs of the shared trunk this budget's decay branched from
        **({"wsd_trunk_flops": trunk_flops} if trunk_flops is not None else {}),
        # training throughput over every run and resume of the variant
        "tokens_per_s": record["tokens"] / record["train_s"] if record["train_s"] else 0.0,
        **record,
    }
    write_json(job / "result.json", record)
    log.info(
        "variant %s, seed %d: valid loss %.4f in %.0f s", v.name, seed, record["valid_loss"], wall
    )
    return record


def _wsd_branch(
    exp: ExperimentConfig, v: VariantConfig, seed: int, cfg: Config
) -> tuple[Config, float]:
    """``budget.schedule=wsd``: train the variant's constant-LR trunk up to the step where this
    budget's decay starts (budgets come in ascending order, so the trunk only grows) and return
    the job's config, a WSD run branched from that checkpoint, with the trunk's FLOPs there."""
    steps = planned_steps(cfg)
    start = decay_start(steps, cfg.train.decay_fraction)
    trunk = Path(exp.dir) / "variants" / v.name / f"seed{seed}" / "trunk"
    ckpt = checkpoint_dir(trunk / "checkpoints", start)
    if find_checkpoint(ckpt) != ckpt:
        latest = latest_checkpoint(trunk / "checkpoints")
        if latest is not None and checkpoint_step(latest) > start:
            raise ConfigError(f"{trunk} is past step {start}, where this budget's decay starts")
        t = replace(cfg.train, schedule="constant", max_flops=None, max_steps=start,
                    keep_checkpoints=len(exp.budgets) + 1, keep_optimizer=True)  # fmt: skip
        log.info("variant %s, seed %d: WSD trunk to step %d", v.name, seed, start)
        train(replace(cfg, train=t, run=replace(cfg.run, dir=str(trunk), resume=True)))
    flops = read_json(ckpt / "state.json")["flops"]
    return replace(cfg, train=replace(cfg.train, schedule="wsd", branch_from=str(ckpt))), flops


def _fewshot(fs: FewshotConfig, scorer: dict | None, v: VariantConfig) -> dict:
    """``{task: {"acc", "acc_norm", "n"}}`` of a trained variant; {} where none can be scored.

    An X-ELM variant (``route_by``) scores each item with the expert of its language, as it
    evaluates documents; its priming examples come from items of the same language.
    """
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
    out = Path(exp.dir)
    plan(exp, out)
    jobs = [(v, b, s) for b in exp.budgets for v in exp.variants for s in exp.seeds]
    records, started = [], time.perf_counter()
    for i, (v, budget, seed) in enumerate(jobs):
        if i:  # time scales with the budget: the rest takes what its FLOPs would take so far
            elapsed = time.perf_counter() - started
            done, left = (sum(b for _, b, _ in part) for part in (jobs[:i], jobs[i:]))
            log.info("job %d of %d: %.0f s so far, about %.0f s to go", i + 1, len(jobs),
                     elapsed, elapsed * left / done)  # fmt: skip
        records.append(run_variant(exp, v, seed, budget))
    write_json(out / "results.json", records)
    references = []
    if exp.budget.schedule == "wsd":  # how far WSD sits from cosine, at the smallest budgets
        for budget in exp.budgets[: exp.budget.wsd_reference]:
            for v in exp.variants:
                references.append(run_variant(exp, v, exp.seeds[0], budget, cosine_reference=True))
        write_json(out / "wsd_reference.json", references)
    study = scaling_study(records, exp.baseline_name) if len(exp.budgets) >= 3 else {}
    if study:
        write_json(out / "scaling.json", study)
    nd = nd_study(records) if len(exp.budgets) >= 2 else {}
    if nd:
        write_json(out / "scaling_nd.json", nd)
    (out / "report.md").write_text(report_markdown(exp, records, study, references, nd))
    plot_compare(records, out, study, exp.baseline_name)
    return records
