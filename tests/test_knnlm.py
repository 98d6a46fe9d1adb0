"""kNN-LM datastore, indexes and interpolation, each against an independent reference."""

import math

import faiss
import numpy as np
import pytest
import torch

from moe_lab import ModelConfig, build_model
from moe_lab.config import MoEConfig
from moe_lab.data.documents import load_documents
from moe_lab.data.packing import TokenStore, build_store, eval_rows
from moe_lab.data.tokenizer import ByteTokenizer, train_bpe
from moe_lab.eval.evaluate import document_nll, evaluate
from moe_lab.eval.knnlm import (
    Datastore,
    IndexSpec,
    build_datastore,
    evaluate_knn,
    interpolate,
    knn_document_nll,
    knn_log_distribution,
    knn_log_prob,
    next_token_log_probs,
    score_tokens,
    split_documents,
    tune_knn,
)
from tests.conftest import write_jsonl

SEQ_LEN = 64  # shorter than some documents: they are keyed in consecutive spans
WORDS = {
    "legal": "the court held that the party shall pay damages under this agreement".split(),
    "code": "def return self if else import class for in range print value".split(),
    "ui": "click save cancel open file settings user name password login".split(),
}
SECURITY = {"legal": "legal", "code": "public", "ui": "public"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models and indexes run fastest on one thread; two OpenMP pools (torch's and faiss's)
    of two threads each fight over a shared 2-core machine (a 2 ms forward measured at 70 ms)."""
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(faiss_threads)


def make_docs(n, seed, lengths=(2, 14)):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        domain = list(WORDS)[i % 3]
        words = rng.choice(WORDS[domain], size=rng.integers(*lengths))
        docs.append(
            {"text": " ".join(words), "domain": domain, "security_domain": SECURITY[domain]}
        )
    return docs


def make_store(tmp_path, records, name):
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    ds = load_documents([str(path)], "text", ["domain", "security_domain"])
    return build_store(ds, ByteTokenizer(), "text", ["domain", "security_domain"], tmp_path / name)


def tiny_model(seed=0, moe=None):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_heads=2, ffn_hidden=64, vocab_size=260, init_std=0.2, moe=moe)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("knn")
    train = make_store(tmp, make_docs(18, 0), "train")
    valid = make_store(tmp, make_docs(12, 1), "valid")
    model = tiny_model()
    ds = build_datastore(model, train, tmp / "dstore", seq_len=SEQ_LEN, tokenizer=ByteTokenizer())
    ds.add_index(IndexSpec("flat"))
    return model, train, valid, ds


def manual_keys(model, ids, key_type):
    """Keys of one span computed alone, layer by layer, without hooks or document masking."""
    h = model.tok_embeddings(ids[None])
    cos, sin = model._rope(torch.arange(len(ids))[None], h.dtype)
    for i, layer in enumerate(model.layers):
        x = h + layer.attention(layer.attention_norm(h), cos, sin, None, None)
        if i == len(model.layers) - 1 and key_type == "ffn_input":
            return layer.ffn_norm(x)[0]
        h = x + layer.feed_forward(layer.ffn_norm(x))[0]
    return model.norm(h)[0]


@pytest.mark.parametrize("key_type", ["ffn_input", "final", "final-moe"])
def test_keys_values_and_provenance_equal_each_document_computed_alone(setup, tmp_path, key_type):
    model, train, _, _ = setup
    if key_type.endswith("-moe"):  # dropless experts: routing stays within each token
        key_type, model = key_type[:-4], tiny_model(moe=MoEConfig(num_experts=4, expert_hidden=16))
    ds = build_datastore(model, train, tmp_path / "d", seq_len=SEQ_LEN, key_type=key_type)
    assert ds.n_entries == int(train.offsets[-1]) - train.n_docs
    assert max(np.diff(train.offsets)) > SEQ_LEN + 1  # some documents need several spans
    packed = [len(set(row[row >= 0].tolist())) for b in eval_rows(train, SEQ_LEN, 8)
              for row in b["doc_index"]]  # fmt: skip
    assert max(packed) > 1  # and some rows hold several documents: masking matters
    for d in range(train.n_docs):
        doc = torch.from_numpy(train.tokens[train.offsets[d] : train.offsets[d + 1]].astype(int))
        rows = np.flatnonzero(ds.docs == d)
        want_keys = []
        with torch.no_grad():
            for start in range(0, len(doc) - 1, SEQ_LEN):  # inputs: all but the EOS
                span = doc[:-1][start : start + SEQ_LEN]
                want_keys.append(manual_keys(model, span, key_type))
        torch.testing.assert_close(torch.from_numpy(ds.keys[rows]), torch.cat(want_keys))
        np.testing.assert_array_equal(ds.vals[rows], doc[1:].numpy())
        np.testing.assert_array_equal(ds.positions[rows], np.arange(len(doc) - 1))
        for field in ("domain", "security_domain"):
            g = train.group_fields.index(field)
            value = train.group_values[g][train.group_codes[d, g]]
            assert set(ds.entry_groups(field)[rows]) == {value}


def test_final_keys_are_the_hidden_states_the_head_reads(setup, tmp_path):
    model, train, _, _ = setup
    ds = build_datastore(model, train, tmp_path / "d", seq_len=SEQ_LEN, key_type="final")
    doc = torch.from_numpy(train.tokens[train.offsets[0] : train.offsets[1]].astype(int))
    with torch.no_grad():
        h, _, _ = model.hidden_states(doc[None, : min(SEQ_LEN, len(doc) - 1)])
    torch.testing.assert_close(torch.from_numpy(np.array(ds.keys[: h.shape[1]])), h[0])


def test_flat_search_finds_each_training_position_at_distance_zero(setup):
    model, train, _, ds = setup
    rows = np.arange(0, ds.n_entries, 7)
    dist, found = ds.search(np.asarray(ds.keys[rows]), k=4)
    assert (dist[:, 0] == 0).all()
    for r, f, d in zip(rows, found, dist, strict=True):
        # identical contexts (every document's BOS, repeated openings) tie at distance 0
        assert r in f[d == 0] or (d == 0).all() and (ds.keys[f] == ds.keys[r]).all()
    # the same from keys recomputed by the model on one document alone (another packing)
    doc = torch.from_numpy(train.tokens[train.offsets[2] : train.offsets[3]].astype(int))
    with torch.no_grad():
        q = manual_keys(model, doc[:-1][:SEQ_LEN], ds.key_type).numpy()
    dist, found = ds.search(q, k=4)
    own = np.flatnonzero(ds.docs == 2)[: len(q)]
    assert dist[:, 0].max() < 1e-8
    for r, f, d in zip(own, found, dist, strict=True):
        assert r in f[d < 1e-8] or (d < 1e-8).all()


def _brute_force(keys, vals, q, k, temperature, vocab):
    """p_kNN from scratch in float64: all distances, sort, softmax, sum per value."""
    d = ((keys.astype(np.float64) - q.astype(np.float64)) ** 2).sum(-1)
    near = np.argsort(d, kind="stable")[:k]
    w = np.exp(-(d[near] - d[near].min()) / temperature)
    p = np.zeros(vocab)
    np.add.at(p, vals[near], w / w.sum())
    return p, np.sort(d)


@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_knn_distribution_equals_brute_force_over_all_keys(setup, temperature):
    model, _, valid, ds = setup
    ids = torch.from_numpy(valid.tokens[valid.offsets[0] : valid.offsets[1]].astype(int))[:40]
    with torch.no_grad():
        q = manual_keys(model, ids, ds.key_type).numpy()
    keys, vals = np.asarray(ds.keys), np.asarray(ds.vals)
    for k in (16, ds.n_entries):
        dist, rows = ds.search(q, k)
        logp = knn_log_distribution(torch.from_numpy(dist), torch.from_numpy(vals[rows]),
                                    temperature, 260)  # fmt: skip
        checked = 0
        for i in range(len(q)):
            p, d_sorted = _brute_force(keys, vals, q[i], k, temperature, 260)
            if k < len(d_sorted) and d_sorted[k] - d_sorted[k - 1] < 1e-4:
                continue  # a tie at the k-th neighbour: either choice is right
            checked += 1
            np.testing.assert_allclose(logp[i].exp().numpy(), p, atol=1e-5)
            t = torch.tensor([int(ids[i + 1]) if i + 1 < len(ids) else 0])
            one = torch.from_numpy(dist[i : i + 1]), torch.from_numpy(vals[rows[i : i + 1]])
            lp = knn_log_prob(*one, t, temperature)
            assert lp.exp().item() == pytest.approx(p[t.item()], abs=1e-5)
        assert checked >= len(q) // 2


def test_log_space_keeps_far_neighbours_that_would_underflow():
    dist = torch.tensor([[0.0, 2000.0, 2000.0]])
    vals = torch.tensor([[5, 7, 7]])
    logp = knn_log_distribution(dist, vals, 1.0, 10)
    assert logp[0, 7].item() == pytest.approx(-2000.0 + math.log(2), abs=1e-9)
    assert logp[0, 5].item() == pytest.approx(0.0, abs=1e-12) and logp[0, 0] == -math.inf
    assert knn_log_prob(dist, vals, torch.tensor([7]), 1.0).item() == pytest.approx(
        -2000.0 + math.log(2), abs=1e-9
    )
    mixed = interpolate(torch.tensor([-3000.0], dtype=torch.float64), logp[0, 7:8], 0.5)
    assert mixed.item() == pytest.approx(-2000.0 + math.log(2) + math.log(0.5), abs=1e-9)


def test_interpolated_distribution_is_normalised_and_lambda_zero_is_the_model(setup):
    model, _, valid, ds = setup
    ids = torch.from_numpy(valid.tokens[: 2 * SEQ_LEN].astype(int)).view(2, SEQ_LEN)
    logp = next_token_log_probs(model, ds, ids, lam=0.3, temperature=2.0, k=32)
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(2, SEQ_LEN, dtype=torch.float64))
    plain = next_token_log_probs(model, ds, ids, lam=0.0, temperature=2.0, k=32)
    want = torch.log_softmax(model(ids).logits.double(), -1)
    torch.testing.assert_close(plain, want)


def test_lambda_zero_equals_document_nll_exactly(setup):
    model, _, valid, ds = setup
    scores = score_tokens(model, ds, valid, seq_len=SEQ_LEN, k=8, batch_size=3)
    nll, count = knn_document_nll(scores, 0.0, 1.0, 8)
    want_nll, want_count = document_nll(model, valid, SEQ_LEN, 3)
    np.testing.assert_array_equal(count, want_count)
    np.testing.assert_allclose(nll, want_nll, rtol=1e-12)
    report = evaluate_knn(
        model, ds, valid, lam=0.0, temperature=1.0, k=8, seq_len=SEQ_LEN, batch_size=3
    )
    assert report == evaluate(model, valid, SEQ_LEN, 3)
    knn = knn_document_nll(scores, 0.25, 1.0, 8)[0]
    assert not np.allclose(knn, want_nll)  # guard: λ > 0 does change the result


def test_tuning_uses_only_the_tuning_documents_and_picks_the_grid_minimum(setup):
    model, _, valid, ds = setup
    tune_docs, report_docs = split_documents(valid.n_docs, 0.5, seed=0)
    assert set(tune_docs).isdisjoint(report_docs) and len(tune_docs) + len(report_docs) == 12
    scores = score_tokens(model, ds, valid, seq_len=SEQ_LEN, k=32, docs=tune_docs)
    assert set(np.unique(scores.doc_index)) == set(tune_docs)
    tuned = tune_knn(scores, lambdas=(0.0, 0.2, 0.5), temperatures=(1.0, 8.0), ks=(8, 32, 999))
    assert len(tuned["grid"]) == 3 * 2 * 2  # k=999 exceeds the neighbours scored: skipped
    assert tuned["loss"] == min(g["loss"] for g in tuned["grid"])
    nll, count = knn_document_nll(scores, tuned["lambda"], tuned["temperature"], tuned["k"])
    assert nll.sum() / count.sum() == pytest.approx(tuned["loss"], rel=1e-12)


def test_ivfpq_agrees_with_flat_on_most_neighbours(setup):
    model, _, valid, ds = setup
    ds.add_index(IndexSpec("ivfpq", code_size=8, nprobe=8))
    ids = torch.from_numpy(valid.tokens[: 4 * SEQ_LEN].astype(int)).view(4, SEQ_LEN)
    with torch.no_grad():
        q = torch.cat([manual_keys(model, row, ds.key_type) for row in ids]).numpy()
    k = 8
    _, exact = ds.search(q, k, "flat")
    dist, approx = ds.search(q, k, "ivfpq")
    recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)])
    print(f"recall@{k} {recall:.3f}")
    assert recall > 0.7, recall
    assert (np.diff(dist, axis=1) >= 0).all()  # recomputed exact distances, re-sorted
    again = Datastore(ds.path)  # the index was saved with the datastore
    np.testing.assert_array_equal(again.search(q, k, "ivfpq")[1], approx)


def test_reloaded_and_fp16_datastores(setup, tmp_path):
    model, train, valid, ds = setup
    q = np.asarray(ds.keys[:50])
    again = Datastore(ds.path)
    np.testing.assert_array_equal(again.search(q, 5)[1], ds.search(q, 5)[1])
    half = build_datastore(model, train, tmp_path / "h", seq_len=SEQ_LEN, dtype="float16")
    assert half.keys.dtype == np.float16
    np.testing.assert_allclose(half.keys, ds.keys, atol=1e-2, rtol=1e-2)


def test_bad_inputs_fail_with_clear_errors(setup, tmp_path):
    model, train, valid, ds = setup
    with pytest.raises(ValueError, match="another model"):
        ds.check(tiny_model(seed=1))
    with pytest.raises(ValueError, match="another model"):  # evaluation checks by itself
        evaluate_knn(tiny_model(seed=1), ds, valid, lam=0.2, temperature=1.0, k=8, seq_len=SEQ_LEN)
    bpe = train_bpe(["the court held that the party"] * 5, 300)
    with pytest.raises(ValueError, match="another tokenizer"):
        ds.check(model, bpe)
    ds.check(model, ByteTokenizer())  # the right pair passes
    for lam in (-0.1, 1.5):
        with pytest.raises(ValueError, match="lambda must be in"):
            evaluate_knn(model, ds, valid, lam=lam, temperature=1.0, k=8, seq_len=SEQ_LEN)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        next_token_log_probs(model, ds, ids, lam=0.5, temperature=0.0, k=4)
    with pytest.raises(ValueError, match=r"k must be in \[1, \d+\]"):
        ds.search(np.asarray(ds.keys[:2]), ds.n_entries + 1)
    empty = TokenStore(
        tokens=np.zeros(0, np.uint16), offsets=np.zeros(1, np.int64),
        n_bytes=np.zeros(0, np.int64), group_codes=np.zeros((0, 0), np.int32),
        group_fields=[], group_values=[], bos_id=256, fingerprint="",
    )  # fmt: skip
    with pytest.raises(ValueError, match="empty"):
        build_datastore(model, empty, tmp_path / "e", seq_len=SEQ_LEN)
    capped = tiny_model(moe=MoEConfig(num_experts=4, expert_hidden=16, capacity_factor=1.0))
    with pytest.raises(ValueError, match="capacity_factor"):
        build_datastore(capped, train, tmp_path / "c", seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="key_type"):
        build_datastore(model, train, tmp_path / "x", seq_len=SEQ_LEN, key_type="attn")
    with pytest.raises(FileExistsError):
        build_datastore(model, train, ds.path, seq_len=SEQ_LEN)
    bare = build_datastore(model, train, tmp_path / "bare", seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="has no 'flat' index"):
        bare.search(np.asarray(bare.keys[:1]), 1)
    with pytest.raises(FileNotFoundError, match="not a kNN-LM datastore"):
        Datastore(tmp_path)
