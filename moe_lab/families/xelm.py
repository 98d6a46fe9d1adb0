"""Cross-lingual expert language models (X-ELM, Blevins et al. 2024), on branch-train-merge.

1. **Languages into groups** (``xelm.grouping``): one expert per language; a user mapping; or
   groups computed offline from the training data itself (no downloads): each language's text is
   summarised as a tf-idf vector of character 1-3-grams, :func:`language_similarity` is the cosine
   between those profiles, and the languages are grouped by average-linkage agglomerative
   clustering of that table (``similarity``) or by balanced k-means of the profiles (``kmeans``,
   the C-BTM clustering applied to languages).
2. **Seed**: a multilingual model trained jointly with temperature sampling over languages
   (``p_l ~ n_l^alpha``, XGLM's alpha = 0.3) for ``xelm.seed_share`` of the budget.
3. **Experts**: :func:`moe_lab.train.branch.train_experts` branches one expert per group from the
   seed and trains it on its languages only; the rest of the budget is split equally.
4. **Adding a language later** (``xelm.add``; X-ELM's hierarchical multi-round training):
   :func:`add_language` branches the new expert from the existing expert whose languages are most
   similar to it and trains it on the new language only, with a first-round expert's budget. No
   existing file is written, so the existing experts stay unchanged bit for bit.
5. **Inference** routes each document to the expert of its ``lang`` value (top-1; a language
   without an expert goes to its most similar expert). Prefix routing by a tf-idf clusterer, for
   text without a language label, is ``moe-lab eval DIR ensemble.routing=prefix
   ensemble.clusters_dir=...`` on the same directory.

``run.dir`` is a :func:`~moe_lab.train.branch.train_experts` directory (``experts/``,
``manifest.json``: ``moe-lab eval`` and ``generate`` work on it) plus ``seed/`` (the seed run) and
``languages.json`` (languages, similarity table, groups, where added languages branched from).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from moe_lab import accounting, budget
from moe_lab.budget import Phase
from moe_lab.config import Config, ConfigError
from moe_lab.data.documents import DataError, load_splits, narrowed, with_group_field
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.ensembles.directory import load_experts
from moe_lab.ensembles.ensemble import ExpertEnsemble, ensemble_document_nll
from moe_lab.ensembles.languages import group_languages, language_similarity
from moe_lab.eval.evaluate import evaluate, validation_store
from moe_lab.families.base import Family, VariantConfig, result
from moe_lab.store.checkpoint import load_run, read_json, write_json
from moe_lab.train.branch import train_experts
from moe_lab.train.loop import train

__all__ = [
    "XELM",
    "add_language",
    "evaluate_by_language",
    "expert_for",
    "first_round",
    "nearest_expert",
    "plan_languages",
    "run_xelm_experiment",
    "texts_by_language",
    "train_xelm",
]


def texts_by_language(cfg: Config) -> dict[str, list[str]]:
    field = cfg.xelm.lang_field
    docs, _, _ = load_splits(with_group_field(cfg, field))
    texts: dict[str, list[str]] = {}
    for text, lang in zip(docs[cfg.data.text_field], docs[field], strict=True):
        texts.setdefault(lang, []).append(text)
    return texts


def first_round(x, texts: dict[str, list[str]]) -> list[str]:
    """The first round's languages (``xelm.languages``, the mapping's, or all but ``xelm.add``)."""
    if x.grouping == "mapping":
        return sorted({lang for langs in x.groups.values() for lang in langs})
    return list(x.languages) or sorted(set(texts) - set(x.add))


def plan_languages(cfg: Config) -> dict:
    """Languages, similarity table and first-round groups; every language checked for data."""
    x = cfg.xelm
    texts = texts_by_language(cfg)
    first = first_round(x, texts)
    missing = sorted(set(first + list(x.add)) - set(texts))
    if missing:
        raise DataError(
            f"languages {missing} have no training documents "
            f"({x.lang_field} values in the data: {sorted(texts)})"
        )
    langs, sim = language_similarity({lang: texts[lang] for lang in first + list(x.add)})
    index = {lang: i for i, lang in enumerate(langs)}
    sub = np.ix_([index[lang] for lang in first], [index[lang] for lang in first])
    if x.grouping == "each":
        groups = {lang: [lang] for lang in first}
    elif x.grouping == "mapping":
        groups = {name: list(v) for name, v in x.groups.items()}
    else:
        groups = group_languages(first, sim[sub], x.n_groups, x.grouping)
    return {"languages": langs, "similarity": sim.tolist(), "groups": groups, "added": {}}


def nearest_expert(plan: dict, lang: str) -> str:
    """The expert whose languages are, on average, most similar to ``lang``."""
    index = {lg: i for i, lg in enumerate(plan["languages"])}
    if lang not in index:
        raise DataError(f"language {lang!r} is not in the similarity table {plan['languages']}")
    sim = np.asarray(plan["similarity"])
    scores = {
        name: float(np.mean([sim[index[lang], index[m]] for m in members]))
        for name, members in plan["groups"].items()
    }
    return max(scores, key=scores.get)


def expert_for(out_dir: str | Path, lang: str) -> str:
    """The expert of an X-ELM run that serves ``lang``: its own, else the most similar one."""
    path = Path(out_dir) / "languages.json"
    if not path.is_file():
        raise ConfigError(f"{out_dir} is not an X-ELM run (no languages.json): --lang needs one")
    plan = read_json(path)
    own = [name for name, langs in plan["groups"].items() if lang in langs]
    return own[0] if own else nearest_expert(plan, lang)


def _sampled(cfg: Config) -> Config:
    """``cfg`` sampling its languages with temperature ``xelm.alpha`` (the seed, each expert with
    several languages, and the dense baseline): small languages are not drowned out."""
    x = cfg.xelm
    return replace(cfg, data=replace(cfg.data, sample_by=x.lang_field, sampling_alpha=x.alpha))


def train_xelm(cfg: Config) -> dict:
    """Seed, first-round experts, then each language of ``xelm.add`` (module docstring).

    ``cfg.train``'s budget covers the seed and the first round; each added language costs one
    first-round expert's budget more. Finished parts are skipped on a second call.

    Returns:
        The language plan (``languages.json``) with the experts' manifest under ``manifest``.
    """
    x, out = cfg.xelm, Path(cfg.run.dir)
    cfg = with_group_field(cfg, x.lang_field)
    cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    if (out / "languages.json").exists():
        plan = read_json(out / "languages.json")
    else:
        plan = plan_languages(cfg)
        write_json(out / "languages.json", plan)
    # The first round only: on a second call, added languages are already in the plan.
    round1 = {n: langs for n, langs in plan["groups"].items() if n not in plan["added"]}
    first = sorted({lang for langs in round1.values() for lang in langs})
    if not (out / "seed" / "eval.json").exists():
        seed = _sampled(cfg)
        seed_data = narrowed(seed.data, {x.lang_field: first})
        seed_train = replace(cfg.train, **budget.share(cfg.train, x.seed_share))
        seed_run = replace(cfg.run, dir=str(out / "seed"), resume=True)
        train(replace(seed, data=seed_data, train=seed_train, run=seed_run))
    shards = {name: {x.lang_field: langs} for name, langs in round1.items()}
    experts_budget = budget.share(cfg.train, 1 - x.seed_share)
    experts_cfg = replace(cfg, train=replace(cfg.train, **experts_budget))
    experts_cfg = _sampled(experts_cfg)
    manifest = train_experts(experts_cfg, shards, out, seed=out / "seed")
    for lang in x.add:
        manifest = add_language(cfg, out, lang)
    plan = read_json(out / "languages.json")
    return plan | {"manifest": manifest}


def add_language(cfg: Config, out_dir: str | Path, lang: str) -> dict:
    """Branch an expert for ``lang`` from its most similar expert; train it on ``lang`` only.

    Returns the experts' manifest. Existing experts are neither retrained nor rewritten.
    """
    x, out = cfg.xelm, Path(out_dir)
    plan = read_json(out / "languages.json")
    if lang in plan["groups"] and lang not in plan["added"]:
        raise ConfigError(f"{lang!r} already has a first-round expert")
    if lang not in plan["languages"]:  # a language the first round never saw: extend the table
        texts = texts_by_language(cfg)
        if lang not in texts:
            raise DataError(f"language {lang!r} has no training documents")
        plan["languages"], sim = language_similarity(
            {lg: texts[lg] for lg in [*plan["languages"], lang]}
        )
        plan["similarity"] = sim.tolist()
    parent = plan["added"].get(lang) or nearest_expert(plan, lang)
    shards = {name: {x.lang_field: langs} for name, langs in plan["groups"].items()}
    shards[lang] = {x.lang_field: [lang]}
    per_expert = (1 - x.seed_share) / len([g for g in plan["groups"] if g not in plan["added"]])
    template = replace(cfg, train=replace(cfg.train, **budget.share(cfg.train, per_expert)))
    manifest = train_experts(
        template,
        shards,
        out,
        seed=out / "experts" / parent / "run",
        budget_split="each",
        only=[lang],
    )
    plan["groups"][lang], plan["added"][lang] = [lang], parent
    write_json(out / "languages.json", plan)
    return manifest


def evaluate_by_language(
    cfg: Config, out_dir: str | Path, experts: list[str] | None = None
) -> dict:
    """Per-group losses of the experts with top-1 routing by each document's language, over the
    validation documents of the run's languages.

    A language without an expert among ``experts`` (default: all) goes to its most similar one.
    """
    x, out = cfg.xelm, Path(out_dir)
    plan = read_json(out / "languages.json")
    names, models = load_experts(out)
    keep = [i for i, n in enumerate(names) if experts is None or n in experts]
    names, models = [names[i] for i in keep], [models[i] for i in keep]
    chosen = {n: plan["groups"][n] for n in names}
    route = {lang: n for n, langs in chosen.items() for lang in langs}
    tokenizer = load_tokenizer(out / "seed" / "tokenizer")
    cfg = with_group_field(cfg, x.lang_field)
    cfg = replace(cfg, data=narrowed(cfg.data, {x.lang_field: plan["languages"]}))
    store = validation_store(cfg, tokenizer)
    g = store.group_fields.index(x.lang_field)
    by_plan = {**plan, "groups": chosen}

    def doc_weights(d: int) -> np.ndarray:
        lang = store.group_values[g][store.group_codes[d, g]]
        expert = route.get(lang) or nearest_expert(by_plan, lang)
        w = np.zeros((store.offsets[d + 1] - store.offsets[d] - 1, len(names)))
        w[:, names.index(expert)] = 1.0
        return w

    report = ensemble_document_nll(
        ExpertEnsemble(models), store, doc_weights, cfg.train.seq_len, cfg.train.eval_batch
    )
    return {"experts": names, "valid": report}


def run_xelm_experiment(cfg: Config) -> dict:
    """X-ELM against the joint multilingual dense baseline at the same training FLOPs.

    The baseline (``run.dir/dense``) is ``cfg.model`` trained on the first-round languages with
    temperature sampling (``xelm.alpha``) for the FLOPs of the seed plus the first-round experts.
    Reports per-language validation loss of the baseline, of the first-round experts (added
    languages routed to their nearest expert) and of all experts; writes ``report.json``.
    """
    x, out = cfg.xelm, Path(cfg.run.dir)
    plan = train_xelm(cfg)
    manifest = plan["manifest"]["experts"]
    first = [n for n in plan["groups"] if n not in plan["added"]]
    seed_flops = read_json(out / "seed" / "eval.json")["flops"]
    xelm_flops = seed_flops + sum(manifest[n]["flops"] for n in first)
    first_langs = sorted({lang for n in first for lang in plan["groups"][n]})
    cfg = with_group_field(cfg, x.lang_field)
    dense_cfg = replace(
        _sampled(cfg),
        data=narrowed(_sampled(cfg).data, {x.lang_field: first_langs}),
        train=replace(cfg.train, max_steps=None, max_tokens=None, max_flops=xelm_flops),
        run=replace(cfg.run, dir=str(out / "dense"), resume=True),
    )
    dense_dir = out / "dense"
    if not (dense_dir / "eval.json").exists():  # finished: left as it is (a language was added)
        train(dense_cfg)
    dense_flops = read_json(dense_dir / "eval.json")["flops"]
    _, model, tokenizer = load_run(dense_dir)
    eval_cfg = replace(cfg, data=narrowed(cfg.data, {x.lang_field: plan["languages"]}))
    store = validation_store(eval_cfg, tokenizer)
    columns = {
        "dense (joint, alpha sampling)": evaluate(
            model, store, cfg.train.seq_len, cfg.train.eval_batch
        ),
        "X-ELM round 1": evaluate_by_language(cfg, out, experts=first)["valid"],
        "X-ELM + added": evaluate_by_language(cfg, out)["valid"],
    }
    loss = {
        name: {lang: c["groups"][x.lang_field][lang]["loss"] for lang in plan["languages"]}
        for name, c in columns.items()
    }
    table = [
        "| language | expert | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    owner = {lang: n for n, langs in plan["groups"].items() for lang in langs}
    for lang in plan["languages"]:
        added = f" (added, from {plan['added'][lang]})" if lang in plan["added"] else ""
        cells = [f"{loss[name][lang]:.4f}" for name in columns]
        table.append(f"| {lang} | {owner[lang]}{added} | " + " | ".join(cells) + " |")
    result = {
        "train_flops": {"xelm_round1": xelm_flops, "dense": dense_flops},
        "groups": plan["groups"],
        "added": plan["added"],
        "loss": loss,
        "table": "\n".join(table),
    }
    write_json(out / "report.json", result)
    return result


class XELM(Family):
    """X-ELM's first round, routed top-1 by each document's language."""

    name = "xelm"

    def check(self, cfg: Config, v: VariantConfig) -> None:
        if cfg.xelm.add:
            raise ConfigError(
                f"variant {v.name!r}: xelm.add trains beyond the budget; compare the first "
                "round (moe-lab xelm reports added languages)"
            )
        # X-ELM is scored on its own languages only: in a comparison they must be all the data's.
        texts = texts_by_language(cfg)
        left_out = sorted(set(texts) - set(first_round(cfg.xelm, texts)))
        if left_out:
            raise ConfigError(
                f"variant {v.name!r}: its X-ELM experts leave out the languages {left_out}, on "
                "which the other variants would still be scored: narrow the data of every "
                f"variant with data.include.{cfg.xelm.lang_field} instead"
            )

    def phases(self, cfg: Config, v: VariantConfig) -> list[Phase]:
        groups = len(plan_languages(with_group_field(cfg, cfg.xelm.lang_field))["groups"])
        share = cfg.xelm.seed_share
        return [Phase(cfg, share, 1), Phase(cfg, (1 - share) / groups, groups)]

    def run(self, cfg: Config, v: VariantConfig, budget: float, job: Path) -> dict:
        cfg = replace(cfg, run=replace(cfg.run, dir=str(job / "xelm")))
        plan = train_xelm(cfg)
        started = time.perf_counter()
        valid = evaluate_by_language(cfg, job / "xelm")["valid"]
        eval_s = time.perf_counter() - started
        runs = [job / "xelm" / "seed"] + [
            job / "xelm" / "experts" / n / "run" for n in plan["groups"]
        ]
        member = accounting.estimate(cfg.model, cfg.train.seq_len)
        cost = accounting.ensemble(member, experts=len(plan["groups"]), active=1)
        scorer = {"run_dir": str(job / "xelm"), "route_by": cfg.xelm.lang_field}
        return result(cost, runs, valid, scorer, eval_s)
