import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_lab import ModelConfig, build_model
from moe_lab.config import load_config
from moe_lab.data.documents import load_splits
from moe_lab.data.packing import build_store
from moe_lab.data.tokenizer import ByteTokenizer, train_bpe
from moe_lab.ensembles.clustering import Clusterer
from moe_lab.ensembles.ensemble import ExpertEnsemble, ensemble_document_nll
from moe_lab.ensembles.merge import average
from moe_lab.ensembles.routers import ClusterRouter
from moe_lab.eval.evaluate import evaluate

CFG = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=260, ffn_hidden=48, init_std=0.3)


def _experts(n):
    return [build_model(CFG) for _ in range(n)]


def _lp(model, x):
    return model(x).logits.log_softmax(-1)


def test_uniform_probability_mixture_equals_the_manual_mixture():
    experts = _experts(3)
    x, t = torch.randint(0, 260, (2, 10)), torch.randint(0, 260, (2, 10))
    w = torch.full((2, 10, 3), 1 / 3)
    manual = torch.stack([_lp(e, x).exp() for e in experts]).mean(0).log()
    ens = ExpertEnsemble(experts)
    torch.testing.assert_close(ens.log_probs(x, w), manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ens.log_probs(x, w, targets=t),
        manual.gather(-1, t[..., None])[..., 0],
        atol=1e-5,
        rtol=1e-5,
    )


def test_k1_weights_equal_the_chosen_expert_alone_and_others_never_run():
    experts = _experts(3)
    calls = [0, 0, 0]
    for j, e in enumerate(experts):
        e.register_forward_hook(lambda *a, j=j: calls.__setitem__(j, calls[j] + 1))
    x = torch.randint(0, 260, (4, 8))
    w = torch.zeros(4, 8, 3)
    w[:2, :, 0], w[2:, :, 2] = 1.0, 1.0  # rows 0-1 use expert 0, rows 2-3 expert 2
    out = ExpertEnsemble(experts).log_probs(x, w)
    assert calls == [1, 0, 1]  # each chosen expert once per batch, the other not at all
    torch.testing.assert_close(out[:2], _lp(experts[0], x[:2]))
    torch.testing.assert_close(out[2:], _lp(experts[2], x[2:]))


def test_logit_mixing_is_log_softmax_of_weighted_logits():
    experts = _experts(2)
    x = torch.randint(0, 260, (1, 6))
    w = torch.tensor([0.25, 0.75]).expand(1, 6, 2)
    expected = (0.25 * experts[0](x).logits + 0.75 * experts[1](x).logits).log_softmax(-1)
    torch.testing.assert_close(ExpertEnsemble(experts, mix="logit").log_probs(x, w), expected)


def test_experts_with_different_vocabularies_are_refused():
    other = build_model(ModelConfig(**{**CFG.__dict__, "vocab_size": 300}))
    with pytest.raises(ValueError, match="disagree on model.vocab_size"):
        ExpertEnsemble([build_model(CFG), other])


@pytest.fixture(scope="module")
def routed():
    train, valid, groups = load_splits(load_config())
    clusterer = Clusterer(3, n_components=30, seed=0)
    clusterer.fit(train["text"])
    store = build_store(
        valid.select(range(12)), ByteTokenizer(), "text", groups, Path(tempfile.mkdtemp())
    )
    return clusterer, store


@pytest.mark.parametrize("bpe", [False, True])
def test_prefix_routing_equals_from_scratch_routing_at_every_position(routed, bpe):
    """Batched over a document's words, as from each prefix's text alone; with a BPE too, whose
    tokens end mid-word and whose prefixes can end inside a multi-byte character."""
    clusterer, store = routed
    router = ClusterRouter(clusterer, temperature=0.1, top_k=2)
    tok = ByteTokenizer()
    doc = store.tokens[store.offsets[0] + 1 : store.offsets[1] - 1].tolist()[:200]
    if bpe:
        text = tok.decode(store.tokens[store.offsets[0] + 1 : store.offsets[1] - 1].tolist())
        tok = train_bpe(iter([text, "naïve café — über straße"] * 3), 300)
        doc = tok.encode("naïve café über " + text)[:200]
    incremental = router.prefix_weights(doc, tok)
    scratch = router.weights(
        [router.routing_text(tok.decode(doc[: t + 1])) for t in range(len(doc))]
    )
    np.testing.assert_allclose(incremental, scratch, atol=1e-5)
    assert ((incremental > 0).sum(1) == 2).all()
    np.testing.assert_allclose(incremental.sum(1), 1.0)
    for text in ("日本語のテキストです", "word"):  # no word ever completes: the empty context
        ids = tok.encode(text)
        expected = router.weights([""] * len(ids))
        np.testing.assert_allclose(router.prefix_weights(ids, tok), expected, atol=1e-12)


def test_router_weight_forms():
    clusterer = Clusterer(2, n_components=2, seed=0)
    clusterer.fit(["apple banana cherry", "apple banana", "durian melon kiwi", "melon kiwi"])
    d = np.array([[0.1, 0.4]])
    paper = ClusterRouter(clusterer, temperature=0.1).weights_from_distances(d)
    np.testing.assert_allclose(paper, [[1 / (1 + math.exp(-3)), 1 / (1 + math.exp(3))]])
    code = ClusterRouter(clusterer, temperature=0.1, distance="cbtm-code").weights_from_distances(d)
    np.testing.assert_allclose(code[0, 0], 1 / (1 + math.exp(-(0.16 - 0.01) / 0.1)))
    top1 = ClusterRouter(clusterer, top_k=1).weights_from_distances(d)
    assert top1.tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="top_k"):
        ClusterRouter(clusterer, top_k=3)


def test_ensemble_evaluation_of_identical_experts_equals_the_single_model(routed):
    clusterer, store = routed
    model = build_model(ModelConfig(**{**CFG.__dict__, "init_std": 0.05}))
    copies = [build_model(model.cfg) for _ in range(3)]
    for c in copies:
        c.load_state_dict(model.state_dict())
    router = ClusterRouter(clusterer, top_k=2)
    tok = ByteTokenizer()

    def by_prefix(d):
        return router.document_weights(
            store.tokens[store.offsets[d] : store.offsets[d + 1]].tolist(), tok
        )

    got = ensemble_document_nll(ExpertEnsemble(copies), store, by_prefix, seq_len=64)
    single = evaluate(average(copies), store, seq_len=64)
    only_first = ExpertEnsemble(copies)
    ensemble_document_nll(
        only_first,
        store,
        lambda d: np.eye(3)[np.zeros(store.offsets[d + 1] - store.offsets[d] - 1, dtype=int)],
        seq_len=64,
    )
    assert only_first.sequences_run[0] > 0
    assert only_first.sequences_run[1:] == [0, 0]  # padding never makes the others run
    assert got["overall"]["tokens"] == single["overall"]["tokens"]
    assert got["overall"]["loss"] == pytest.approx(single["overall"]["loss"], rel=1e-5)
    for value, m in single["groups"]["domain"].items():
        assert got["groups"]["domain"][value]["loss"] == pytest.approx(m["loss"], rel=1e-5)
    # Which expert served which group: the routing weights of every predicted token, summed
    # document by document in a plain loop, against the report's shares.
    g = store.group_fields.index("domain")
    for code, value in enumerate(store.group_values[g]):
        docs = [d for d in range(store.n_docs) if store.group_codes[d, g] == code]
        summed = sum(by_prefix(d).sum(axis=0) for d in docs)
        expected = summed / summed.sum()
        assert got["routing"]["groups"]["domain"][value][0] == pytest.approx(expected.tolist())


def test_ensemble_generation_with_one_hot_routing_equals_the_expert_alone():
    from moe_lab.ensembles.generation import generate_ensemble
    from moe_lab.eval.generation import generate

    experts = _experts(3)
    prompt = [256, 10, 20, 30]
    route = lambda ids: np.eye(3)[1]  # noqa: E731
    ids = generate_ensemble(ExpertEnsemble(experts), prompt, 12, route)
    alone = generate(experts[1], torch.tensor([prompt]), 12)[0].tolist()
    assert ids == alone


def test_a_byte_level_bpe_decodes_every_prefix_as_its_decoder_does():
    """decode_prefixes (token bytes, one C decode per prefix) equals decode of each prefix, also
    for random ids that cut multi-byte characters and for special tokens."""
    tok = train_bpe(iter(["naïve café — über straße 日本語のテキスト", "plain words"] * 5), 320)
    rng = np.random.default_rng(0)
    for ids in [np.asarray(tok.encode("naïve café 日本語")), rng.integers(0, tok.vocab_size, 200)]:
        expected = [tok.decode(ids[: t + 1]) for t in range(len(ids))]
        assert list(tok.decode_prefixes(ids)) == expected
