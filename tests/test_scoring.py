"""The Scorer interface: batched, padded scoring equals one forward pass per sequence for dense and
MoE models and for routed expert ensembles; greedy continuation; what load_scorer recognises."""

import gzip
import json

import numpy as np
import pytest
import torch

from moe_lab.config import ConfigError
from moe_lab.data.documents import CORPUS_DIR
from moe_lab.data.tokenizer import ByteTokenizer
from moe_lab.ensembles.clustering import Clusterer
from moe_lab.ensembles.merge import average
from moe_lab.ensembles.routers import ClusterRouter
from moe_lab.ensembles.scoring import EnsembleScorer
from moe_lab.eval.generation import generate
from moe_lab.eval.scoring import TransformerScorer, encode_pair, rolling_windows
from moe_lab.families.loading import load_scorer
from tests.tiny import MOE, naive_logprobs, tiny_model, write_experts, write_run

TOK = ByteTokenizer()


def _seqs(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[TOK.bos_id, *torch.randint(0, 256, (n - 1,), generator=gen).tolist()] for n in lengths]


@pytest.mark.parametrize(
    "kind", [[], MOE, [*MOE, "model.moe.capacity_factor=1.0"]], ids=["dense", "moe", "capacity"]
)
def test_batched_padded_scores_equal_one_forward_per_sequence(kind):
    model = tiny_model(*kind)
    seqs = _seqs([2, 97, 40, 41, 5, 97, 13])  # 97 = max_len + 1: the longest scorable sequence
    scores = TransformerScorer(model, TOK, batch_size=3).score(seqs)
    for seq, s in zip(seqs, scores, strict=True):
        ref = naive_logprobs(model, seq)
        np.testing.assert_allclose(s.logprobs, ref, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            argmax = model(torch.tensor([seq[:-1]])).logits[0].argmax(-1).numpy()
        np.testing.assert_array_equal(s.greedy, argmax == np.array(seq[1:]))
    assert scores[0].greedy.dtype == bool and not all(s.greedy.all() for s in scores)


def test_sequences_outside_the_context_are_refused():
    scorer = TransformerScorer(tiny_model(), TOK)
    with pytest.raises(ValueError, match=r"sequence 1 has 98 tokens.*max_len \+ 1 = 97"):
        scorer.token_logprobs(_seqs([5, 98]))
    with pytest.raises(ValueError, match="sequence 0 has 1 tokens"):
        scorer.token_logprobs([[TOK.bos_id]])


@pytest.fixture(scope="module")
def clustered_experts(tmp_path_factory):
    """Three random experts and a 3-cluster clusterer on part of the shipped corpus."""
    root = tmp_path_factory.mktemp("experts")
    with gzip.open(CORPUS_DIR / "train.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for line in f][::8]
    clusterer = Clusterer(3, n_components=8, seed=0)
    clusterer.fit(texts)
    clusterer.save(root / "clusters" / "clusterer")
    overrides = [f"ensemble.clusters_dir={root / 'clusters'}", "ensemble.top_k=2"]
    models = write_experts(root / "run", 3, *overrides)
    return root / "run", models, ClusterRouter(clusterer, 0.1, 2)


def test_prefix_routed_ensemble_equals_a_per_position_mixture_of_the_experts(clustered_experts):
    run, experts, router = clustered_experts
    scorer = load_scorer(run)
    assert isinstance(scorer, EnsembleScorer)
    texts = ["To be, or not to be: that is the", "def f(x):\n    return", "Article 1 All"]
    seqs = [[TOK.bos_id, *TOK.encode(t)] for t in texts]
    got = EnsembleScorer(scorer.ensemble, scorer.routing, TOK, batch_size=2).token_logprobs(seqs)
    for seq, lp in zip(seqs, got, strict=True):
        expected = []
        for t in range(1, len(seq)):  # p(x_t | x_<t) = sum_j w_j(text so far) p_j(x_t | x_<t)
            w = router.weights([router.routing_text(TOK.decode(seq[1:t]))])[0]
            p = sum(
                w[j] * np.exp(naive_logprobs(e, seq[: t + 1])[-1]) for j, e in enumerate(experts)
            )
            expected.append(np.log(p))
        np.testing.assert_allclose(lp, expected, atol=1e-4, rtol=1e-4)
    assert 0 < min(scorer.ensemble.sequences_run) < len(seqs)  # top-2 of 3: some expert skipped


def test_greedy_continuation_matches_generate_and_stops_after_an_until_string():
    model = tiny_model()
    scorer = TransformerScorer(model, TOK)
    prompt = [TOK.bos_id, *TOK.encode("the cat")]
    new = scorer.greedy(prompt, 30)
    reference = generate(model, torch.tensor([prompt]), 30, eos_id=TOK.eos_id)[0].tolist()
    assert new == reference[len(prompt) :][: len(new)] and len(new) == 30
    until = TOK.decode(new[6:8])
    stopped = scorer.greedy(prompt, 30, until=[until])
    assert until in TOK.decode(stopped) and until not in TOK.decode(stopped[:-1])
    assert stopped == new[: len(stopped)]
    assert len(scorer.greedy(prompt, 500)) == scorer.max_len - len(prompt)  # the context is full


def test_ensemble_greedy_is_the_argmax_of_the_mixture(clustered_experts):
    run, experts, router = clustered_experts
    scorer = load_scorer(run)
    prompt = [TOK.bos_id, *TOK.encode("Thou art")]
    ids = list(prompt)
    for _ in range(8):
        w = router.weights([router.routing_text(TOK.decode(ids[1:]))])[0]
        with torch.no_grad():
            probs = sum(
                w[j] * e(torch.tensor([ids])).logits[0, -1].double().softmax(-1).numpy()
                for j, e in enumerate(experts)
            )
        ids.append(int(probs.argmax()))
    assert scorer.greedy(prompt, 8) == ids[len(prompt) :]


def test_load_scorer_recognises_runs_experts_and_their_routing(tmp_path):
    model = write_run(tmp_path / "run", *MOE)
    scorer = load_scorer(tmp_path / "run")
    seq = _seqs([30])
    np.testing.assert_allclose(scorer.token_logprobs(seq)[0], naive_logprobs(model, seq[0]), 1e-5)
    with pytest.raises(ConfigError, match="--lang applies to X-ELM"):
        load_scorer(tmp_path / "run", lang="en")

    experts = write_experts(tmp_path / "x", 2)
    (tmp_path / "x" / "languages.json").write_text(
        json.dumps({"languages": ["en", "de"], "groups": {"e0": ["en"], "e1": ["de"]}})
    )
    german = load_scorer(tmp_path / "x", lang="de").token_logprobs(seq)[0]
    np.testing.assert_allclose(german, naive_logprobs(experts[1], seq[0]), atol=1e-5, rtol=1e-5)
    averaged = load_scorer(tmp_path / "x", ["ensemble.routing=average"])
    assert isinstance(averaged, TransformerScorer)
    np.testing.assert_allclose(
        averaged.token_logprobs(seq)[0], naive_logprobs(average(experts), seq[0]), 1e-5
    )
    with pytest.raises(ConfigError, match="oracle routes by the whole document"):
        load_scorer(tmp_path / "x", ["ensemble.routing=oracle"])
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_scorer(tmp_path / "nothing")


def test_encode_pair_moves_trailing_space_to_the_continuation():
    assert encode_pair(TOK, "Q: a b ", "c") == (TOK.encode("Q: a b"), TOK.encode(" c"))
    assert encode_pair(TOK, "", "xy") == ([], TOK.encode("xy"))
    from moe_lab.data.tokenizer import train_bpe

    bpe = train_bpe(iter(["the world is the world of the words"] * 50), vocab_size=300)
    ctx, cont = encode_pair(bpe, "hello the ", "world")  # BPE merges " world" into one token
    assert ctx + cont == bpe.encode("hello the world") and cont == bpe.encode(" world")
    assert len(cont) == 1


@pytest.mark.parametrize("n", [0, 1, 5, 8, 9, 20])
def test_rolling_windows_predict_every_token_once_with_the_most_context(n):
    tokens = list(range(n))
    windows = rolling_windows(tokens, prefix=-1, max_len=4)
    predicted = [t for seq, k in windows for t in seq[len(seq) - k :]]
    assert predicted == tokens
    assert all(len(seq) <= 5 for seq, _ in windows)
    if n:
        assert windows[0][0][0] == -1 and len(windows[-1][0]) == min(n + 1, 5)
