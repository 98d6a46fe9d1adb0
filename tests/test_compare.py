"""moe-lab compare: variants trained to one FLOP budget, resumable, refused when incomparable."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import moe_lab.families.cbtm as cbtm_module
import moe_lab.families.dense as dense_module
from moe_lab.accounting import estimate
from moe_lab.compare import fit_scaling, load_experiment, run_compare
from moe_lab.compare.plan import plan
from moe_lab.config import ConfigError, ModelConfig, load_config
from moe_lab.data.documents import CORPUS_DIR, load_documents, load_splits
from moe_lab.eval.fewshot import choice_logliks, corpus_cloze, evaluate_task, load_task
from moe_lab.eval.scoring import TransformerScorer
from moe_lab.families.base import VariantConfig
from moe_lab.families.cbtm import CBTM
from moe_lab.families.xelm import expert_for
from moe_lab.store.checkpoint import load_run
from tests.conftest import write_jsonl

MODEL = {
    "dim": 32,
    "n_layers": 2,
    "n_heads": 2,
    "n_kv_heads": 1,
    "vocab_size": 260,
    "ffn_hidden": 64,
    "max_seq_len": 64,
}
TRAIN = {
    "batch_size": 2,
    "eval_batch_size": 32,
    "seq_len": 32,
    "warmup_steps": 5,
    "progress": False,
    "checkpoint_every": 1000,
    "eval_max_batches": 2,
    "peak_flops": 1e11,  # so that CPU runs report an MFU, as GPU runs do by themselves
}
STEPS = 300  # dense steps in the budget: enough whole steps for every run to land within 1%


def budget() -> float:
    return 2 * 32 * estimate(ModelConfig(**MODEL), 32).train_flops_per_token * STEPS


def experiment(tmp_path, variants, **extra):
    # A small evaluation set (every 6th shipped validation document) keeps the ensembles' prefix
    # routing, which re-vectorises every prefix, quick.
    docs = load_documents([str(CORPUS_DIR / "valid.jsonl.gz")], "text", ["domain", "lang"])
    valid = write_jsonl(tmp_path / "valid.jsonl", [docs[i] for i in range(0, len(docs), 6)])
    path = tmp_path / "exp.yaml"
    path.write_text(
        json.dumps(
            {
                "name": "tiny",
                "dir": str(tmp_path / "out"),
                "budget": {"train_flops": budget()},
                "base": {
                    "model": MODEL,
                    "train": TRAIN,
                    "data": {"group_fields": ["domain", "lang"], "valid_files": [str(valid)]},
                },
                "variants": variants,
                **extra,
            }
        )
    )
    return load_experiment(path)


VARIANTS = [
    {"name": "dense", "family": "dense"},
    {
        "name": "moe",
        "family": "moe",
        "overrides": ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32"],
    },
    {"name": "cbtm", "family": "cbtm", "k": 2, "top_k": 1},
    {"name": "cbtm-random", "family": "cbtm", "k": 2, "top_k": 1, "random_clusters": True},
]


def trained_run(exp, variant: str) -> Path:
    """The training run directory of a single-model variant's first seed."""
    job = Path(exp.dir) / "variants" / variant / "seed0"
    return next(p.parent for p in job.rglob("config.yaml") if (p.parent / "checkpoints").is_dir())


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    task = write_jsonl(
        tmp / "cloze.jsonl", corpus_cloze(3, context_bytes=24, continuation_bytes=12)[::40]
    )
    exp = experiment(tmp, VARIANTS, fewshot={"tasks": [str(task)], "shots": 1})
    return exp, run_compare(exp)


def test_every_variant_reaches_the_budget_within_one_percent(compared):
    exp, records = compared
    assert [r["name"] for r in records] == ["dense", "moe", "cbtm", "cbtm-random"]
    for r in records:
        assert abs(r["train_flops"] / exp.budget.train_flops - 1) <= 0.01, r["name"]
        assert r["flops_vs_budget"] == r["train_flops"] / exp.budget.train_flops
    dense, moe, cbtm, random = records
    per_token = estimate(ModelConfig(**MODEL), 32).train_flops_per_token
    assert dense["train_flops"] == dense["tokens"] * per_token  # tokens follow from the budget
    assert moe["total_params"] > moe["active_params"]  # 4 experts, 2 active
    assert cbtm["total_params"] == 2 * dense["total_params"]
    assert cbtm["inference_flops_per_token"] == dense["inference_flops_per_token"]  # top-1
    # ... nominally: prefix routing that moves within a document runs more than one expert
    assert cbtm["measured_inference_flops_per_token"] > cbtm["inference_flops_per_token"]
    assert dense["measured_inference_flops_per_token"] == dense["inference_flops_per_token"]
    for r in records:  # evaluation time apart: final evaluations, the ensemble's, few-shot
        assert 0 < r["eval_s"] < r["wall_s"], r["name"]
    assert cbtm["eval_s"] > dense["eval_s"]  # the ensemble: routing, and two experts' passes
    # ... and only the ensemble: C-BTM's seed and experts are not scored on their own
    job = Path(exp.dir) / "variants" / "cbtm" / "seed0"
    for run in (job / "seed", *(job / "experts" / "experts").glob("c*/run")):
        summary = json.loads((run / "eval.json").read_text())
        assert summary["valid"] is None and summary["eval_s"] == 0 and summary["flops"] > 0, run
    manifest = json.loads((job / "experts" / "manifest.json").read_text())
    assert len(manifest["experts"]) == 2
    # The random-cluster ablation differs from its twin in the clusters only: same costs, and
    # routed the same way (prefix, top-1) through its own clusters' centroids.
    for key in ("total_params", "active_params", "inference_flops_per_token", "train_flops"):
        assert random[key] == cbtm[key], key
    cfg = load_config(Path(exp.dir) / "variants" / "cbtm" / "seed0" / "config.yaml")
    twin, ablation = (CBTM().ensemble(cfg, VariantConfig(**v), Path("c")) for v in VARIANTS[2:])
    assert twin == ablation and twin.routing == "prefix" and twin.top_k == 1
    assert random["valid_loss"] != cbtm["valid_loss"]


def test_cbtm_experts_train_on_their_whole_shard_and_validate_on_their_cluster(compared):
    exp, _ = compared
    shards = Path(exp.dir) / "variants" / "cbtm" / "seed0" / "clusters" / "shards"
    experts = shards.parents[1] / "experts" / "experts"
    for c in range(2):
        cfg = load_config(experts / f"c{c}" / "run" / "config.yaml")
        train_docs, _, _ = load_splits(cfg)  # none held out for validation
        assert len(train_docs) == len(
            (shards / "train" / f"cluster_00{c}.jsonl").read_text().splitlines()
        )
        valid = shards / "valid" / f"cluster_00{c}.jsonl"
        assert valid.stat().st_size and cfg.data.valid_files == [str(valid)]


def test_the_report_holds_every_variant_and_group_value(compared):
    exp, records = compared
    out = Path(exp.dir)
    report = (out / "report.md").read_text()
    assert "lie within 1% of the budget" in report
    for r in records:
        assert f"[{r['name']}]({r['config']})" in report and (out / r["config"]).is_file()
        for field, values in r["groups"].items():
            assert set(values) == set(records[0]["groups"][field])
            for value in values:
                assert f"{field}={value}" in report
    assert {"domain", "lang"} <= set(records[0]["groups"])
    n_groups = sum(len(v) for v in records[0]["groups"].values())
    assert report.count("**") == 2 * (2 + n_groups + 2)  # + acc and acc_norm of the task
    assert report.splitlines()[2].startswith("- moe ")  # the findings first, against dense
    assert "## Against dense" in report and "(1 seed)" in report
    assert "cloze acc | cloze acc_norm" in report
    assert "| tokens/s | MFU |" in report
    for r in records:  # over every run of the variant: a C-BTM's seed and experts too
        assert r["mfu"] == pytest.approx(r["train_flops"] / r["train_s"] / 1e11, rel=1e-9)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(records))
    assert (out / "loss_vs_flops.png").stat().st_size > 0 and (out / "groups.png").is_file()
    # What the routers did: the MoE's token routers and the ensembles' cluster routers.
    assert [r["name"] for r in records if "routing" in r] == ["moe", "cbtm", "cbtm-random"]
    routing = report.split("## Routing", 1)[1]
    assert all(f"| {n} | " in routing for n in ("moe", "cbtm", "cbtm-random"))
    assert "| dense | " not in routing and (out / "routing.png").stat().st_size > 0
    moe_eval = json.loads((trained_run(exp, "moe") / "eval.json").read_text())["valid"]["routing"]
    assert json.loads(json.dumps(records[1]["routing"])) == moe_eval
    assert len(records[2]["routing"]["layers"]) == 1  # one sequence-level router


def test_every_variant_is_scored_on_the_fewshot_task(compared):
    exp, records = compared
    task = exp.fewshot.tasks[0]
    items = load_task(task)
    for r in records:
        assert r["fewshot"][task]["n"] == len(items) > 0, r["name"]
    # the dense variant scored again from its run directory, by hand
    _, model, tokenizer = load_run(trained_run(exp, "dense"))
    alone = evaluate_task(TransformerScorer(model, tokenizer), items, shots=1)["overall"]
    assert records[0]["fewshot"][task] == alone


def test_an_interrupted_compare_redoes_only_unfinished_variants(compared, monkeypatch):
    exp, records = compared
    calls = []
    original = dense_module.train
    for module in (dense_module, cbtm_module):  # the modules that train dense, moe and cbtm
        monkeypatch.setattr(
            module, "train", lambda cfg, **kw: calls.append(cfg.run.dir) or original(cfg, **kw)
        )
    (Path(exp.dir) / "variants" / "moe" / "seed0" / "result.json").unlink()
    again = run_compare(exp)
    assert len(calls) == 1 and "/moe/" in calls[0]  # dense and cbtm were not touched
    assert again[1]["valid_loss"] == records[1]["valid_loss"]  # resumed from its last checkpoint
    assert [r["name"] for r in again] == ["dense", "moe", "cbtm", "cbtm-random"]


@pytest.mark.parametrize(
    ("variants", "extra", "match"),
    [
        ([{"name": "x", "family": "transformer-xl"}], {}, "unknown family 'transformer-xl'"),
        (
            [{"name": "a"}, {"name": "b", "overrides": ["data.tokenizer=bpe"]}],
            {},
            r"'b' changes data.tokenizer .* share the tokenizer and evaluation data",
        ),
        (
            [{"name": "a"}, {"name": "b", "overrides": ["data.valid_fraction=0.2"]}],
            {},
            "changes data.valid_fraction",
        ),
        (
            [{"name": "a", "overrides": ["train.max_steps=10"]}],
            {},
            "the budget is the experiment's",
        ),
        ([{"name": "a"}], {"budget": {"train_flops": 1e3}}, "smallest run exceeds the budget"),
        ([{"name": "a"}], {"budget": {"train_flops": budget() / STEPS * 20.5}}, "more than 1% off"),
        ([{"name": "a", "family": "moe"}], {}, "sets no model.moe"),
        ([{"name": "c", "family": "cbtm", "k": 0}], {}, r"k \(clusters\) must be at least 1"),
        ([{"name": "c", "family": "cbtm", "top_k": 5}], {}, r"top_k must be in \[1, k=4\]"),
        (
            [{"name": "x", "family": "xelm", "overrides": ["xelm.languages=[en,de]"]}],
            {},
            r"leave out the languages \[.*'fr'.*\].*data.include.lang",
        ),
        ([], {}, "lists no variants"),
    ],
)
def test_incomparable_experiments_are_refused_before_training(tmp_path, variants, extra, match):
    with pytest.raises(ConfigError, match=match):
        run_compare(experiment(tmp_path, variants, **extra))
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_scaling_fit_recovers_a_known_law():
    E, A, gamma = 1.7, 400.0, 0.28
    records = [
        {"train_flops": c, "valid_loss": E + A * c**-gamma} for c in (1e12, 3e12, 1e13, 3e13, 1e14)
    ]
    fit = fit_scaling(records)
    assert fit["E"] == pytest.approx(E, rel=1e-3) and fit["gamma"] == pytest.approx(gamma, rel=1e-3)
    assert fit["A"] == pytest.approx(A, rel=1e-2) and fit["rmse"] < 1e-6
    with pytest.raises(ValueError, match="3 or more"):
        fit_scaling(records[:2])


def test_xelm_and_ifc_variants_are_charged_the_same_budget(tmp_path):
    variants = [
        {"name": "dense", "family": "dense"},
        {
            "name": "xelm",
            "family": "xelm",
            "overrides": ["xelm.grouping=kmeans", "xelm.n_groups=2", "xelm.seed_share=0.5"],
        },
        {
            "name": "ifc",
            "family": "ifc",
            "overrides": [
                "model.moe.num_experts=2",
                "model.moe.expert_hidden=32",
                "ifc.domain_field=domain",
                "ifc.public=literature",
                "ifc.domains=[legal]",
            ],
        },
    ]
    task = write_jsonl(tmp_path / "cloze.jsonl", corpus_cloze(3, 24, 12)[::10])
    records = run_compare(experiment(tmp_path, variants, fewshot={"tasks": [str(task)]}))
    dense, xelm, ifc = records
    for r in records:
        assert abs(r["flops_vs_budget"] - 1) <= 0.01, r["name"]
    assert xelm["total_params"] == 2 * dense["total_params"]  # two language-group experts
    assert xelm["inference_flops_per_token"] == dense["inference_flops_per_token"]  # top-1
    assert set(xelm["groups"]["lang"]) == set(dense["groups"]["lang"])
    assert ifc["groups"]["domain"].keys() == dense["groups"]["domain"].keys()
    # FlexOlmo runs IFC's phases with other settings (the same plan), and with router tuning a
    # phase more: each planned within 1% of the budget
    flexolmo = {**variants[2], "name": "flexolmo", "family": "flexolmo"}
    tuned = {**flexolmo, "name": "tuned",
             "overrides": [*flexolmo["overrides"], "ifc.router_tuning_share=0.1"]}  # fmt: skip
    exp = experiment(tmp_path, [flexolmo, tuned])
    plans = plan(exp, tmp_path / "plan")
    assert plans["flexolmo"]["flops"][exp.budgets[0]] == pytest.approx(ifc["train_flops"])
    for name in ("flexolmo", "tuned"):
        (reached,) = plans[name]["flops"].values()
        assert abs(reached / exp.budgets[0] - 1) <= 0.01
    # Few-shot: IFC as its all-domain principal sees it; X-ELM item by item with the expert of
    # the item's language, here recomputed with that expert's model alone.
    items = load_task(str(task))
    assert ifc["fewshot"][str(task)]["n"] == len(items)
    out = Path(tmp_path / "out" / "variants" / "xelm" / "seed0" / "xelm")
    correct = []
    for item in items:
        _, model, tokenizer = load_run(out / "experts" / expert_for(out, item["lang"]) / "run")
        ll, _ = choice_logliks(TransformerScorer(model, tokenizer), [item])
        correct.append(int(ll[0].argmax()) == item["label"])
    assert xelm["fewshot"][str(task)]["acc"] == pytest.approx(np.mean(correct))
    with pytest.raises(ConfigError, match="xelm.add trains beyond the budget"):
        run_compare(experiment(tmp_path, [{**variants[1], "overrides": ["xelm.add=[pt]"]}]))


def test_merged_variants_average_or_btx_the_experts_within_the_budget(tmp_path):
    variants = [
        {"name": "avg", "family": "cbtm", "k": 2, "merge": "average"},
        {
            "name": "btx",
            "family": "cbtm",
            "k": 2,
            "top_k": 1,
            "merge": "btx",
            "finetune_share": 0.2,
            "router_init": "data",
        },
    ]
    avg, btx = run_compare(experiment(tmp_path, variants))
    dense_params = estimate(ModelConfig(**MODEL), 32).total_params
    assert avg["total_params"] == dense_params  # one averaged model
    assert btx["total_params"] > dense_params and btx["active_params"] < btx["total_params"]
    for r in (avg, btx):
        assert abs(r["flops_vs_budget"] - 1) <= 0.01, r["name"]
    out = Path(tmp_path / "out" / "variants" / "btx" / "seed0" / "btx" / "run")
    trained = load_config(out / "config.yaml")
    assert trained.model.moe.num_experts == 2 and trained.train.init_from.endswith("merged")
    # router_init=data: each router row is the mean FFN input of its expert over its shard, so
    # the rows differ from each other and from the N(0, 0.02) init by far more than its scale
    merged = out.parent / "merged" / "checkpoints"
    weights = load_file(next(merged.iterdir()) / "model.safetensors")
    rows = weights["layers.0.feed_forward.router.gate.weight"]
    assert not torch.equal(rows[0], rows[1]) and rows.abs().mean() > 0.1
    # The averaged model's evaluation differs from the BTX model's: they are different models.
    assert avg["valid_loss"] != btx["valid_loss"]


def test_moe_lab_scaling_prints_and_plots_a_fit_per_variant(tmp_path, capsys):
    from moe_lab.cli import main

    files = []
    for i, c in enumerate((1e12, 3e12, 1e13, 3e13)):
        records = [
            {"name": "dense", "train_flops": c, "valid_loss": 1.7 + 400 * c**-0.28},
            {"name": "moe", "train_flops": c, "valid_loss": 1.6 + 400 * c**-0.28},
        ]
        (tmp_path / f"r{i}").mkdir()
        files.append(tmp_path / f"r{i}" / "results.json")
        files[-1].write_text(json.dumps(records))
    assert main(["scaling", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert "dense: L(C) = 1.7000 + " in out and "moe: L(C) = 1.6000 + " in out
    assert (tmp_path / "r0" / "scaling.png").is_file()


def test_knn_lm_is_reported_for_single_model_variants(tmp_path, lang_files):
    from moe_lab.eval.evaluate import document_nll, validation_store
    from moe_lab.eval.knnlm.lm import split_documents

    exp = experiment(tmp_path, [{"name": "dense", "family": "dense"}], knn={"enabled": True})
    exp.base["data"] = {
        "train_files": [str(lang_files[0])],
        "valid_files": [str(lang_files[1])],
        "group_fields": ["lang"],
    }
    exp.budget.train_flops /= 10
    (record,) = run_compare(exp)
    knn = record["knn"]
    run = trained_run(exp, "dense")
    cfg, model, tokenizer = load_run(run)
    store = validation_store(cfg, tokenizer)
    nll, count = document_nll(model, store, cfg.train.seq_len, cfg.train.batch_size)
    _, reported = split_documents(store.n_docs)
    assert abs(knn["lm_loss"] - nll[reported].sum() / count[reported].sum()) < 1e-5
    assert knn["knn_loss"] < knn["lm_loss"]  # the datastore holds the same two languages
    report = (Path(exp.dir) / "report.md").read_text()
    assert "LM loss (half) | kNN-LM loss (half)" in report and f"{knn['knn_loss']:.4f}" in report


def test_a_budget_sweep_runs_every_variant_at_every_budget_and_fits_the_curves(
    tmp_path, monkeypatch
):
    budgets = [budget() / 4, budget() / 2, budget()]
    variants = VARIANTS[:2]  # dense, moe: one run each, whole steps within 1% at B / 4
    exp = experiment(tmp_path, variants, budget={"sweep": budgets}, seeds=[0, 1])
    records = run_compare(exp)
    assert [(r["name"], r["budget_flops"], r["seed"]) for r in records] == [
        (v["name"], b, s) for b in budgets for v in variants for s in (0, 1)
    ]
    for r in records:
        assert abs(r["flops_vs_budget"] - 1) <= 0.01 and r["budget_flops"] in budgets
    out = Path(exp.dir)
    assert len(list(out.glob("variants/*/flops*/seed*/result.json"))) == len(records)
    study = json.loads((out / "scaling.json").read_text())
    assert set(study) == {"dense", "moe"} and study["moe"]["crossover"]["searched"][1] > budgets[-1]
    report = (out / "report.md").read_text()
    assert "## Scaling fits" in report and report.count("## Against dense") == 1
    for b in budgets:  # a paired test per budget
        assert f"| {b:.3g} | moe | " in report
    assert "over 2 seeds" in report.splitlines()[2]

    def retrain(*args, **kwargs):
        raise AssertionError("a finished job trained again")

    monkeypatch.setattr(dense_module, "train", retrain)
    assert run_compare(exp) == json.loads((out / "results.json").read_text())


def test_a_wsd_sweep_branches_each_budget_from_one_trunk(tmp_path):
    budgets = [budget() / 4, budget() / 2]
    exp = experiment(tmp_path, VARIANTS[:1], budget={"sweep": budgets, "schedule": "wsd"})
    records = run_compare(exp)
    out = Path(exp.dir)
    trunk = out / "variants" / "dense" / "seed0" / "trunk"
    assert load_config(trunk / "config.yaml").train.schedule == "constant"
    small, large = records
    for r in records:  # each decay is charged the FLOPs of a whole WSD run of its budget
        assert abs(r["flops_vs_budget"] - 1) <= 0.01
        assert 0.75 * r["train_flops"] < r["wsd_trunk_flops"] < 0.85 * r["train_flops"]
        run = out / r["config"]
        assert load_config(run).train.schedule == "wsd"
    assert small["wsd_trunk_flops"] < large["wsd_trunk_flops"]
    spent = large["wsd_trunk_flops"] + sum(r["train_flops"] - r["wsd_trunk_flops"] for r in records)
    saved = 1 - spent / (small["train_flops"] + large["train_flops"])
    report = (out / "report.md").read_text()
    assert "## Warmup-stable-decay" in report and f"| {saved:.0%} |" in report and saved > 0.2
    # ... and how far WSD sits from ordinary cosine runs of the two budgets
    references = json.loads((out / "wsd_reference.json").read_text())
    assert [r["budget_flops"] for r in references] == budgets
    for ref, r in zip(references, records, strict=True):
        assert load_config(out / ref["config"]).train.schedule == "cosine"
        assert ref["config"].endswith("seed0-cosine/config.yaml")
        assert f"| {r['valid_loss']:.4f} | {ref['valid_loss']:.4f} | " in report
    with pytest.raises(ConfigError, match="budget.schedule=wsd .* family 'cbtm'"):
        plan(experiment(tmp_path, VARIANTS[2:3], budget={"sweep": budgets, "schedule": "wsd"}),
             tmp_path / "refused")  # fmt: skip
