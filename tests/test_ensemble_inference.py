"""Expert-ensemble inference: BTM's posterior routing against a naive Bayes update, measured
inference FLOPs against a hand count, a document-level route running exactly k experts, and
cached generation against the uncached one."""

import json
import math

import numpy as np
import pytest
import torch

from moe_lab import ModelConfig, build_model
from moe_lab.ensembles.posterior import (
    cached_prior,
    expert_log_likelihoods,
    posterior_weights,
    top_k_weights,
)
from moe_lab.ensembles.stacked import StackedExperts

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden=48,
                  init_std=0.3, max_seq_len=96)  # fmt: skip


def _experts(n, seed=0):
    torch.manual_seed(seed)
    return [build_model(CFG).eval() for _ in range(n)]


def test_the_posterior_is_a_naive_bayes_update_over_the_experts_likelihoods():
    experts = _experts(3)
    doc = [1, *torch.randint(3, 64, (14,)).tolist(), 2]
    with torch.no_grad():  # p_j(x_s | x_<s), one prefix at a time
        probs = [
            [
                expert(torch.tensor([doc[:s]])).logits[0, -1].softmax(-1)[doc[s]].item()
                for s in range(1, len(doc))
            ]
            for expert in experts
        ]
    prior = [0.5, 0.3, 0.2]
    loglik = expert_log_likelihoods(experts, doc, seq_len=64)
    assert loglik == pytest.approx(np.log(probs), abs=1e-5)
    weights = posterior_weights(loglik, np.array(prior))
    for t in range(len(doc) - 1):
        joint = [prior[j] * math.prod(probs[j][:t]) for j in range(3)]
        assert weights[t] == pytest.approx([x / sum(joint) for x in joint], rel=1e-4)
    top1 = posterior_weights(loglik, np.array(prior), top_k=1)
    assert (top1.max(axis=1) == 1.0).all() and (top1.argmax(1) == weights.argmax(1)).all()
    finals = [np.array([math.prod(p) for p in probs])]
    assert cached_prior([loglik]) == pytest.approx(finals[0] / finals[0].sum(), rel=1e-4)


def test_top_k_keeps_the_largest_and_renormalises():
    w = top_k_weights(np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]), 2)
    assert w == pytest.approx(np.array([[0, 2 / 3, 1 / 3], [0.625, 0, 0.375]]))


def _shifting_route(E):
    """Experts chosen by the sequence length: the set changes every few tokens, so experts
    join mid-sequence (a prefill), leave, and come back (a catch-up)."""
    plans = [[0], [1, 2], [0, 2], [3], [1]]

    def route(ids):
        w = np.zeros(E)
        chosen = plans[(len(ids) // 3) % len(plans)]
        w[chosen] = 1.0 / len(chosen)
        return w

    return route, plans


@pytest.mark.parametrize("mix", ["prob", "logit"])
def test_cached_ensemble_generation_equals_the_uncached_one(mix):
    from moe_lab.ensembles.ensemble import ExpertEnsemble
    from moe_lab.ensembles.generation import generate_ensemble

    experts = _experts(4, seed=1)
    route, _ = _shifting_route(4)
    prompt = [1, 5, 9, 11]
    for temperature in (0.0, 1.0):  # greedy, and sampling from the same generator state
        runs = []
        for use_cache in (True, False):
            gen = torch.Generator().manual_seed(3)
            ens = ExpertEnsemble(experts, mix=mix)
            runs.append(generate_ensemble(ens, prompt, 30, route, temperature=temperature,
                                          generator=gen, use_cache=use_cache))  # fmt: skip
        assert runs[0] == runs[1] and len(runs[0]) == len(prompt) + 30


def test_cached_generation_feeds_each_expert_each_token_once():
    """An expert's tokens are the sequence as it stood at its last turn: each token once."""
    from moe_lab.ensembles.ensemble import ExpertEnsemble
    from moe_lab.ensembles.generation import generate_ensemble

    route, _ = _shifting_route(4)
    ens = ExpertEnsemble(_experts(4, seed=1))
    prompt = [1, 5, 9, 11]
    ids = generate_ensemble(ens, prompt, 30, route)
    last_turn = [0] * 4
    for length in range(len(prompt), len(ids)):
        for j in np.flatnonzero(route(ids[:length])):
            last_turn[j] = length
    assert ens.tokens_run == last_turn
    uncached = ExpertEnsemble(ens.experts)
    generate_ensemble(uncached, prompt, 30, route, use_cache=False)
    assert sum(uncached.tokens_run) > 4 * sum(ens.tokens_run)  # quadratic against linear


@pytest.mark.parametrize("mix", ["prob", "logit"])
def test_stacked_experts_generate_what_each_expert_alone_generates(mix, monkeypatch):
    """Sets of two experts hold for three tokens, so they form a batch, leave it and form new
    ones (each expert's cache moving between batches); the tokens and each expert's count are
    those of every expert running alone."""
    from moe_lab.ensembles import generation
    from moe_lab.ensembles.ensemble import ExpertEnsemble

    formed = []

    def spy(experts):
        formed.append(len(experts))
        return StackedExperts(experts)

    monkeypatch.setattr(generation, "StackedExperts", spy)
    experts = _experts(4, seed=1)
    route, _ = _shifting_route(4)
    for temperature in (0.0, 1.0):
        runs, counts = [], []
        for stack in (True, False):
            ens = ExpertEnsemble(experts, mix=mix)
            gen = torch.Generator().manual_seed(3)
            ids = generation.generate_ensemble(
                ens, [1, 5, 9, 11], 40, route, temperature, generator=gen, stack=stack
            )
            runs.append(ids)
            counts.append(ens.tokens_run)
        assert runs[0] == runs[1] and counts[0] == counts[1]
    assert len(formed) >= 4 and set(formed) == {2}


def test_without_room_for_the_stacked_copy_the_experts_run_one_at_a_time(monkeypatch):
    from moe_lab.ensembles import generation
    from moe_lab.ensembles.ensemble import ExpertEnsemble

    experts = _experts(4, seed=1)
    route, _ = _shifting_route(4)
    unstacked = ExpertEnsemble(experts)
    ids = generation.generate_ensemble(unstacked, [1, 5], 30, route, stack=False)
    asked = []
    monkeypatch.setattr(
        generation, "_room_to_stack", lambda group: asked.append(tuple(map(id, group))) or False
    )
    monkeypatch.setattr(generation, "_Group", None)  # forming a group would fail
    ens = ExpertEnsemble(experts)
    assert generation.generate_ensemble(ens, [1, 5], 30, route) == ids
    assert ens.tokens_run == unstacked.tokens_run
    assert len(asked) == len(set(asked)) >= 2  # each set asked once: a refusal is remembered


@pytest.mark.gpu
def test_experts_whose_stacked_copy_would_not_fit_the_gpu_run_one_at_a_time(monkeypatch):
    from moe_lab.ensembles import generation
    from moe_lab.ensembles.ensemble import ExpertEnsemble

    experts = [e.cuda() for e in _experts(4, seed=1)]
    route, _ = _shifting_route(4)
    unstacked = generation.generate_ensemble(
        ExpertEnsemble(experts), [1, 5], 20, route, stack=False
    )
    need = sum(p.numel() * p.element_size() for p in experts[0].parameters()) * 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * need - 1, 10 * need))
    monkeypatch.setattr(generation, "_Group", None)  # forming a group would fail
    assert generation.generate_ensemble(ExpertEnsemble(experts), [1, 5], 20, route) == unstacked


def test_measured_flops_count_every_expert_a_shifting_route_ran(tmp_path):
    """Top-1 at every position, but document 0 switches expert half way: both run on it."""
    from moe_lab.accounting import estimate
    from moe_lab.ensembles.ensemble import ExpertEnsemble, ensemble_document_nll
    from tests.test_knnlm import make_docs, make_store

    store = make_store(tmp_path, make_docs(5, 2, (3, 9)), "valid")
    torch.manual_seed(2)
    byte_cfg = ModelConfig(**{**CFG.__dict__, "vocab_size": 260})  # the byte tokenizer's ids
    experts = [build_model(byte_cfg).eval() for _ in range(3)]
    lengths = [int(store.offsets[d + 1] - store.offsets[d] - 1) for d in range(store.n_docs)]

    def route(d):
        w = np.zeros((lengths[d], 3))
        w[:, d % 3] = 1.0
        if d == 0:
            w[lengths[d] // 2 :] = [0.0, 1.0, 0.0]
        return w

    ens = ExpertEnsemble(experts)
    report = ensemble_document_nll(ens, store, route, seq_len=64, batch_size=2)
    ran = [0, 0, 0]  # by hand: each expert, the tokens of the documents that chose it
    for d, n in enumerate(lengths):
        for j in {d % 3} | ({1} if d == 0 else set()):
            ran[j] += n
    assert ens.tokens_run == ran
    per_token = estimate(byte_cfg, 64).inference_flops_per_token
    assert report["inference"]["flops_per_token"] == pytest.approx(
        sum(ran) * per_token / sum(lengths)
    )
    assert report["inference"]["expert_passes_per_token"] > 1.0  # the nominal top-1 is 1


@pytest.fixture(scope="module")
def expert_dir(tmp_path_factory):
    """Three random tiny experts, a 3-cluster clusterer, and short validation documents."""
    from moe_lab.ensembles.clustering import Clusterer
    from tests.conftest import write_jsonl
    from tests.test_knnlm import make_docs
    from tests.tiny import write_experts

    root = tmp_path_factory.mktemp("experts")
    write_experts(root / "exp", 3)
    docs = make_docs(30, 0, (3, 9))
    clusterer = Clusterer(3, n_components=4, seed=0)
    clusterer.fit([d["text"] for d in docs])
    clusterer.save(root / "clusters" / "clusterer")
    data = [f"data.train_files=[{write_jsonl(root / 'train.jsonl', docs)}]",
            f"data.valid_files=[{write_jsonl(root / 'valid.jsonl', docs[:9])}]",
            "data.group_fields=[domain]", f"ensemble.clusters_dir={root / 'clusters'}"]  # fmt: skip
    return root, data


def _evaluate(expert_dir, *overrides):
    from moe_lab.ensembles.ensemble import evaluate_experts
    from tests.tiny import tiny_cfg

    root, data = expert_dir
    return evaluate_experts(root / "exp", tiny_cfg(*data, *overrides))


def test_a_document_level_route_runs_exactly_k_experts(expert_dir):
    shifting = _evaluate(expert_dir, "ensemble.routing=prefix", "ensemble.top_k=1")["valid"]
    fixed = _evaluate(expert_dir, "ensemble.routing=document", "ensemble.top_k=2")["valid"]
    tokens = fixed["overall"]["tokens"]
    assert sum(fixed["inference"]["tokens_per_expert"]) == 2 * tokens
    assert fixed["inference"]["expert_passes_per_token"] == 2.0
    assert shifting["inference"]["expert_passes_per_token"] > 1.0  # top-1 that moves costs more


def test_posterior_routing_evaluates_the_naive_bayes_mixture(expert_dir):
    from moe_lab.data.tokenizer import ByteTokenizer
    from moe_lab.ensembles.directory import load_experts
    from tests.tiny import naive_logprobs

    root, _ = expert_dir
    report = _evaluate(expert_dir, "ensemble.routing=posterior", "ensemble.top_k=2")["valid"]
    _, experts = load_experts(root / "exp")
    texts = [json.loads(line)["text"] for line in (root / "valid.jsonl").open()]
    total, count = 0.0, 0
    for text in texts:
        doc = [256, *ByteTokenizer().encode(text), 257]
        lp = np.stack([naive_logprobs(e, doc) for e in experts])  # [E, N]
        for t in range(lp.shape[1]):
            post = np.exp(lp[:, :t].sum(axis=1))
            post /= post.sum()
            keep = np.argsort(-post)[:2]
            w = np.zeros(3)
            w[keep] = post[keep] / post[keep].sum()
            total -= math.log(sum(w[j] * math.exp(lp[j, t]) for j in range(3)))
        count += lp.shape[1]
    assert report["overall"]["loss"] == pytest.approx(total / count, rel=1e-5)
    assert report["inference"]["expert_passes_per_token"] == 3.0  # every expert scores the prefix
    cached = _evaluate(expert_dir, "ensemble.routing=posterior", "ensemble.prior=cached",
                       "ensemble.top_k=1")  # fmt: skip
    assert cached["valid"]["inference"]["expert_passes_per_token"] == 1.0
    assert sum(cached["prior"]) == pytest.approx(1.0)


def test_every_routing_mode_from_one_scoring_pass_equals_its_own_evaluation(expert_dir):
    from moe_lab.ensembles.modes import MODES, evaluate_routing_modes
    from tests.tiny import tiny_cfg

    root, data = expert_dir
    shared = tiny_cfg(*data, "ensemble.top_k=2", "train.seq_len=8")  # spans cut the documents
    reports = evaluate_routing_modes(root / "exp", shared, list(MODES))
    for mode in MODES:
        routing, prior = (mode.split("-") + ["cached"])[:2] if "posterior" in mode else (mode, "-")
        overrides = [f"ensemble.routing={routing}", "ensemble.top_k=2", "train.seq_len=8"]
        overrides += [f"ensemble.prior={prior}"] if routing == "posterior" else []
        alone, together = _evaluate(expert_dir, *overrides)["valid"], reports[mode]
        assert together["overall"]["loss"] == pytest.approx(alone["overall"]["loss"], rel=1e-5)
        for value, m in alone["groups"]["domain"].items():
            assert together["groups"]["domain"][value]["loss"] == pytest.approx(m["loss"], 1e-5)
        assert together["inference"] == pytest.approx(alone["inference"]), mode
        assert together["routing"]["layers"] == pytest.approx(alone["routing"]["layers"]), mode
    # The CLI: two of the modes, each expert scoring once, into eval-modes.json.
    from moe_lab.cli import main

    overrides = [*data, "ensemble.top_k=2", "train.seq_len=8"]
    assert (
        main(["eval", str(root / "exp"), *overrides, "--routing-modes", "prefix", "uniform"]) == 0
    )
    written = json.loads((root / "exp" / "eval-modes.json").read_text())["modes"]
    assert list(written) == ["prefix", "uniform"]
    assert written["prefix"]["overall"]["loss"] == pytest.approx(
        reports["prefix"]["overall"]["loss"]
    )
    # ... and a single model's run is refused in one line (exit code 2), not silently evaluated
    single = root / "exp" / "experts" / "e0" / "run"
    assert main(["eval", str(single), *data, "--routing-modes", "prefix"]) == 2
