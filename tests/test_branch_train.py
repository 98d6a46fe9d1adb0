"""Branch-train-merge end to end: seed -> clusters -> independent experts -> routed ensemble."""

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import moe_lab.train.branch as branch_module
from moe_lab.config import ConfigError, load_config
from moe_lab.data.documents import load_splits
from moe_lab.data.packing import build_store, cache_root
from moe_lab.data.tokenizer import ByteTokenizer, train_bpe
from moe_lab.ensembles.clustering import Clusterer
from moe_lab.ensembles.clustering.run import cluster_documents
from moe_lab.ensembles.directory import load_experts
from moe_lab.ensembles.ensemble import ExpertEnsemble, ensemble_document_nll
from moe_lab.ensembles.routers import ClusterRouter
from moe_lab.eval.evaluate import evaluate
from moe_lab.store.checkpoint import latest_checkpoint
from moe_lab.train.branch import _shard_data, train_experts
from moe_lab.train.loop import train
from tests.conftest import SHORT_RUN


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("btm")
    seed = train(
        load_config(overrides=[*SHORT_RUN, "train.max_steps=6", f"run.dir={root / 'seed'}"])
    )
    cluster_documents(load_config(overrides=["cluster.k=2", f"run.dir={root / 'clusters'}"]))
    shards = {
        f"c{c}": [str(root / "clusters" / "shards" / "train" / f"cluster_00{c}.jsonl")]
        for c in range(2)
    }
    template = load_config(
        overrides=[
            *SHORT_RUN,
            "train.max_steps=4",
            "data.group_fields=[domain,lang]",
            f"run.dir={root / 'unused'}",
        ]
    )
    manifest = train_experts(template, shards, root / "experts", seed=seed.run_dir)
    return root, seed, shards, template, manifest


def test_each_expert_trains_only_on_its_shard_from_the_seed(pipeline):
    root, seed, shards, _, manifest = pipeline
    assert list(manifest["experts"]) == ["c0", "c1"]
    seed_weights = load_file(latest_checkpoint(seed.run_dir / "checkpoints") / "model.safetensors")
    expert_weights = []
    for name, files in shards.items():
        entry = manifest["experts"][name]
        assert entry["data"] == files and entry["steps"] == 2  # equal split of 4 steps
        run_cfg = load_config(root / "experts" / "experts" / name / "run" / "config.yaml")
        assert run_cfg.data.train_files == files and run_cfg.train.init_from == str(seed.run_dir)
        first = json.loads(
            (root / "experts" / "experts" / name / "run" / "metrics.jsonl")
            .read_text()
            .splitlines()[0]
        )
        assert first["loss"] < 0.9 * np.log(512)  # starts from the seed, not from random init
        expert_weights.append(load_file(entry["weights"]))
    key = "layers.0.feed_forward.w1.weight"
    assert not torch.equal(expert_weights[0][key], seed_weights[key])
    assert not torch.equal(expert_weights[0][key], expert_weights[1][key])


def test_finished_experts_are_skipped(pipeline, monkeypatch):
    root, seed, shards, template, manifest = pipeline
    monkeypatch.setattr(branch_module, "train", lambda cfg: pytest.fail("retrained"))
    again = train_experts(template, shards, root / "experts", seed=seed.run_dir)
    assert again["experts"] == manifest["experts"]


def test_proportional_budget_split_and_bad_split(pipeline, tmp_path):
    root, seed, shards, template, _ = pipeline
    from moe_lab.train.branch import expert_budgets

    template = replace(template, train=replace(template.train, max_steps=100))  # a copy
    budgets = expert_budgets(template, shards, "proportional")
    sizes = [sum(len(open(f, "rb").read()) for f in files) for files in shards.values()]
    assert budgets["c0"]["max_steps"] == int(100 * sizes[0] / sum(sizes))
    with pytest.raises(ConfigError, match="budget split must be one of"):
        expert_budgets(template, shards, "by-vibes")


def test_routed_ensemble_of_the_experts_evaluates_per_group(pipeline):
    root, seed, _, template, _ = pipeline
    names, experts = load_experts(root / "experts")
    assert names == ["c0", "c1"]
    clusterer = Clusterer.load(root / "clusters" / "clusterer")
    router = ClusterRouter(clusterer, temperature=0.1, top_k=1)
    _, valid, groups = load_splits(template)
    store = build_store(valid, ByteTokenizer(), "text", groups, cache_root(None))
    tok = ByteTokenizer()

    def by_prefix(d):
        doc = store.tokens[store.offsets[d] : store.offsets[d + 1]].tolist()
        return router.document_weights(doc, tok)

    report = ensemble_document_nll(ExpertEnsemble(experts), store, by_prefix, seq_len=64)
    single = evaluate(experts[0], store, seq_len=64)
    assert report["overall"]["tokens"] == single["overall"]["tokens"]
    assert set(report["groups"]["lang"]) == set(single["groups"]["lang"])
    assert np.isfinite(report["overall"]["loss"]) and report["overall"]["loss"] < np.log(512)


@pytest.mark.parametrize("routing", ["prefix", "uniform", "oracle", "average"])
def test_moe_lab_eval_on_a_directory_of_experts(pipeline, routing, capsys):
    from moe_lab.cli import main

    root = pipeline[0]
    rc = main(
        [
            "eval",
            str(root / "experts"),
            f"ensemble.routing={routing}",
            f"ensemble.clusters_dir={root / 'clusters'}",
            "ensemble.top_k=1",
        ]
    )
    assert rc == 0
    report = json.loads((root / "experts" / "eval.json").read_text())
    assert report["experts"] == ["c0", "c1"] and report["ensemble"]["routing"] == routing
    assert set(report["valid"]["groups"]) == {"domain", "lang"}
    if routing == "uniform":
        runs = report["sequences_run_per_expert"]
        assert runs["c0"] == runs["c1"] > 0
    assert "overall" in capsys.readouterr().out


def test_ensemble_routing_without_a_clusterer_is_a_clear_error(pipeline, capsys):
    from moe_lab.cli import main

    assert main(["eval", str(pipeline[0] / "experts"), "ensemble.routing=prefix"]) == 2
    assert "ensemble.routing=prefix needs ensemble.clusters_dir" in capsys.readouterr().err


def test_moe_lab_generate_from_a_directory_of_experts(pipeline, capsys):
    from moe_lab.cli import main

    root = pipeline[0]
    rc = main(
        [
            "generate",
            str(root / "experts"),
            "--prompt",
            "And God said",
            "--max-new-tokens",
            "8",
            f"ensemble.clusters_dir={root / 'clusters'}",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0 and out.out.startswith("And God said")
    # the cost line: each expert's count, adding up to the total, every position run at least once
    cost = re.search(r"(\d+) new tokens; the experts processed (\d+) tokens, prompt included "
                     r"\((.*)\)", out.err)  # fmt: skip
    new, total = int(cost[1]), int(cost[2])
    counts = [int(c.split(": ")[1]) for c in cost[3].split(", ")]
    positions = len("And God said") + new  # BOS and the prompt's bytes, then all but the last
    assert 1 <= new <= 8 and sum(counts) == total and positions <= total <= 2 * positions


def test_moe_lab_generate_with_averaged_experts_is_the_average_model(pipeline, capsys):
    from moe_lab.cli import main
    from moe_lab.ensembles.merge import average
    from moe_lab.eval.generation import generate

    root = pipeline[0]
    args = ["generate", str(root / "experts"), "--prompt", "And God", "--max-new-tokens", "6"]
    assert main([*args, "--temperature", "0", "ensemble.routing=average"]) == 0
    tok = ByteTokenizer()
    prompt = [tok.bos_id, *tok.encode("And God")]
    ids = generate(average(load_experts(root / "experts")[1]), torch.tensor([prompt]), 6)[0]
    assert capsys.readouterr().out == "And God" + tok.decode(ids[len(prompt) :].tolist()) + "\n"
    assert main([*args, "ensemble.routing=oracle"]) == 2
    assert "has not written yet" in capsys.readouterr().err


def test_expert_jobs_through_submitit_local_processes(pipeline, tmp_path):
    submitit = pytest.importorskip("submitit")
    from moe_lab.train.launch import submit_experts, wait_for

    root, seed, shards, template, manifest = pipeline
    executor = submitit.LocalExecutor(folder=tmp_path / "logs")
    executor.update_parameters(timeout_min=10)
    jobs = submit_experts(executor, template, shards, tmp_path / "experts", seed=seed.run_dir)
    assert len(jobs) == 2 and len({job.job_id for job in jobs}) == 2  # separate processes
    combined = wait_for(jobs, tmp_path / "experts")
    assert list(combined["experts"]) == ["c0", "c1"]  # shard order, whichever finished first
    for name, entry in combined["experts"].items():
        assert entry["steps"] == manifest["experts"][name]["steps"] == 2
        assert entry["valid_loss"] == pytest.approx(manifest["experts"][name]["valid_loss"])


def test_experts_per_group_value_train_on_that_value_only(pipeline, tmp_path):
    _, seed, _, template, _ = pipeline
    shards = {"de": {"lang": ["de"]}, "fr": {"lang": ["fr"]}}
    manifest = train_experts(
        template, shards, tmp_path, seed=seed.run_dir, budget_split="proportional"
    )
    assert list(manifest["experts"]) == ["de", "fr"]
    for name in shards:
        run = tmp_path / "experts" / name / "run"
        assert load_config(run / "config.yaml").data.include == {"lang": [name]}
        report = json.loads((run / "eval.json").read_text())["valid"]
        assert list(report["groups"]["lang"]) == [name]  # validated on its own language too


def test_a_group_shard_narrows_the_templates_own_filters():
    template = load_config(overrides=["data.include.domain=[legal,code]"])
    assert _shard_data(template, {"lang": ["de"]}).include == {
        "domain": ["legal", "code"],
        "lang": ["de"],
    }


def test_experts_that_cannot_be_mixed_are_refused(pipeline, tmp_path):
    root, _, shards, template, _ = pipeline
    bpe = replace(template, data=replace(template.data, tokenizer="bpe"))
    with pytest.raises(ConfigError, match="each fit their own BPE"):
        train_experts(bpe, shards, tmp_path / "scratch", seed=None)
    assert not (tmp_path / "scratch").exists()  # refused before anything was written
    copy = tmp_path / "copy"
    shutil.copytree(root / "experts", copy)
    other = train_bpe(iter(["an expert with a tokenizer of its own"] * 20), vocab_size=300)
    shutil.rmtree(copy / "experts" / "c1" / "run" / "tokenizer")
    other.save(copy / "experts" / "c1" / "run" / "tokenizer")
    with pytest.raises(ConfigError, match="'c0' and 'c1' tokenize differently"):
        load_experts(copy)
    (copy / "manifest.json").write_text(json.dumps({"experts": {}}))
    with pytest.raises(ConfigError, match="no finished expert"):
        load_experts(copy)


def test_expert_jobs_as_ray_tasks(pipeline, tmp_path):
    ray = pytest.importorskip("ray")
    from moe_lab.train.launch import submit_experts_ray, wait_for

    root, seed, shards, template, manifest = pipeline
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"MOE_LAB_CACHE": str(tmp_path / "cache")}},
    )
    try:
        refs = submit_experts_ray(template, shards, tmp_path / "experts", seed=seed.run_dir)
        combined = wait_for(refs, tmp_path / "experts")
    finally:
        ray.shutdown()
    assert list(combined["experts"]) == ["c0", "c1"]
    for name, entry in combined["experts"].items():
        assert entry["valid_loss"] == pytest.approx(manifest["experts"][name]["valid_loss"])
