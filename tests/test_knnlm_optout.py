"""Opt-out and provenance: after removal, nothing the kNN-LM predicts depends on the document."""

import numpy as np
import pytest
import torch

from moe_lab.data.packing import eval_rows
from moe_lab.data.policy import AccessPolicy, PolicyError
from moe_lab.eval.knnlm import (
    Datastore,
    IndexSpec,
    KnnIndex,
    build_datastore,
    next_token_log_probs,
    opt_out,
)
from tests.test_knnlm import SEQ_LEN, _one_thread, make_docs, make_store, tiny_model  # noqa: F401

OPTED = 4  # the document that opts out (a "ui" document, security domain public)
PARAMS = dict(lam=0.5, temperature=4.0)


def _datastore(tmp_path, model, records, name, kinds=("flat",)):
    store = make_store(tmp_path, records, name)
    ds = build_datastore(model, store, tmp_path / f"{name}-knn", seq_len=SEQ_LEN)
    for kind in kinds:
        ds.add_index(IndexSpec(kind, code_size=8))
    return ds


def _queries(tmp_path):
    valid = make_store(tmp_path, make_docs(3, 7), "queries")
    batch = next(eval_rows(valid, SEQ_LEN, 4))
    return batch["input_ids"], batch["doc_ids"]


def test_after_opt_out_predictions_equal_never_having_the_document(tmp_path):
    model = tiny_model()
    records = make_docs(12, 0)
    altered = [dict(r) for r in records]
    altered[OPTED]["text"] = "login password " * 9 + "click"  # other words and another length
    without = records[:OPTED] + records[OPTED + 1 :]
    full = _datastore(tmp_path, model, records, "full")
    changed = _datastore(tmp_path, model, altered, "altered")
    never = _datastore(tmp_path, model, without, "never")
    ids, doc_ids = _queries(tmp_path)
    k = never.n_entries  # every entry is a neighbour: no tie at a k-th place can hide a change
    want = next_token_log_probs(model, never, ids, doc_ids, k=k, **PARAMS)
    before = next_token_log_probs(model, full, ids, doc_ids, k=k, **PARAMS)
    assert (before - want).abs().max() > 1e-3  # guard: the document did matter

    n_doc = int(np.count_nonzero(full.docs == OPTED))
    full, removed = opt_out(full, docs=[OPTED])
    changed, _ = opt_out(changed, docs=[OPTED])
    assert removed == n_doc and full.n_entries == never.n_entries
    for ds in (full, changed, Datastore(full.path)):  # the last one reopened from disk
        got = next_token_log_probs(model, ds, ids, doc_ids, k=k, **PARAMS)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert OPTED not in set(ds.docs) and ds.index("flat").ntotal == ds.n_entries
        _, rows = ds.search(np.asarray(ds.keys), 8)
        assert (rows >= 0).all()  # every search result is a live row: no stale id in the index
    on_disk = Datastore(full.path)
    assert on_disk.manifest["opted_out"]["docs"] == [OPTED]
    assert on_disk.manifest["n_entries"] == len(np.load(full.path / "keys.npy", mmap_mode="r"))
    with pytest.raises(ValueError, match="already opted out"):
        opt_out(full, docs=[OPTED])


def test_opt_out_by_group_value_retrains_ivfpq_and_never_returns_the_group(tmp_path):
    model = tiny_model()
    ds = _datastore(tmp_path, model, make_docs(30, 0), "grp", kinds=("flat", "ivfpq"))
    legal = ds.entry_groups("domain") == "legal"
    q = np.asarray(ds.keys[legal][:200])  # queries whose nearest entries are legal ones
    _, rows = ds.search(q, 8, "ivfpq")
    assert (ds.entry_groups("domain")[rows] == "legal").any()  # guard
    assert ds.provenance("security_domain") == ["legal", "public"]
    with pytest.raises(PolicyError, match="legal"):  # a public-only principal may not use it
        AccessPolicy.check("datastore", ds.provenance("security_domain"), ["public"])
    ds, removed = opt_out(ds, where={"domain": ["legal"]})
    assert removed == int(legal.sum()) and ds.provenance("security_domain") == ["public"]
    AccessPolicy.check("datastore", ds.provenance("security_domain"), ["public"])  # now usable
    # the IVF-PQ codebooks are refitted: the index is the one the remaining keys alone give
    fresh = KnnIndex.build(ds.keys, ds.ids, ds.index("ivfpq").spec)
    for got, want in zip(ds.index("ivfpq").search(q, 8), fresh.search(q, 8), strict=True):
        np.testing.assert_array_equal(got, want)
    for kind in ("flat", "ivfpq"):
        assert ds.index(kind).ntotal == ds.n_entries
        _, rows = ds.search(q, 8, kind)
        assert "legal" not in set(ds.entry_groups("domain")[rows[rows >= 0]])
    assert Datastore(ds.path).manifest["opted_out"]["where"] == [["domain", ["legal"]]]
    ds, _ = opt_out(ds, where={"domain": ["code", "ui"]})  # everything: IVF-PQ cannot retrain
    assert ds.n_entries == 0 and ds.index("flat").ntotal == 0
    assert "ivfpq" not in ds.manifest["indexes"]  # dropped, and the opt-out still happened
    with pytest.raises(ValueError, match=r"k must be in \[1, 0\]"):
        ds.search(q, 1)


def _brute_force_rows(ds, q, k, allowed):
    keys = np.asarray(ds.keys, dtype=np.float64)
    d = ((keys[None] - q[:, None].astype(np.float64)) ** 2).sum(-1)
    d[:, ~allowed] = np.inf
    return np.sort(d, axis=1)[:, :k]


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_provenance_filter_never_returns_a_forbidden_entry(tmp_path, kind):
    model = tiny_model()
    ds = _datastore(tmp_path, model, make_docs(30, 0), "prov", kinds=(kind,))
    policy = AccessPolicy.from_dict({"principals": {"guest": [], "alice": ["legal"]}})
    security = ds.entry_groups("security_domain")
    q = np.asarray(ds.keys[security == "legal"][:100])  # the forbidden entries' own keys
    _, rows = ds.search(q, 8, kind)
    assert (security[rows] == "legal").mean() > 0.5  # guard: unfiltered, they are mostly near
    guest = ds.permitted(policy, "guest")
    dist, rows = ds.search(q, 8, kind, allowed=guest)
    assert (rows >= 0).all() and set(security[rows].ravel()) == {"public"}
    if kind == "flat":  # exactly the nearest permitted entries
        np.testing.assert_allclose(dist, _brute_force_rows(ds, q, 8, guest), rtol=1e-5, atol=1e-5)
    alice = ds.permitted(policy, "alice")
    assert alice.all()
    with pytest.raises(PolicyError, match="unknown principal"):
        ds.permitted(policy, "mallory")
    with pytest.raises(ValueError, match="permitted entries"):
        ds.search(q, int(guest.sum()) + 1, kind, allowed=guest)


def test_a_principal_s_predictions_do_not_depend_on_forbidden_documents(tmp_path):
    model = tiny_model()
    records = make_docs(12, 0)
    altered = [
        dict(r, text="the court shall pay " * 4) if r["security_domain"] == "legal" else r
        for r in records
    ]
    policy = AccessPolicy.from_dict({"principals": {"guest": []}})
    ids, doc_ids = _queries(tmp_path)
    out = []
    for name, recs in (("orig", records), ("alt", altered)):
        ds = _datastore(tmp_path, model, recs, name)
        allowed = ds.permitted(policy, "guest")
        out.append(next_token_log_probs(model, ds, ids, doc_ids, k=64, allowed=allowed, **PARAMS))
        out.append(next_token_log_probs(model, ds, ids, doc_ids, k=64, **PARAMS))
    torch.testing.assert_close(out[0], out[2], rtol=1e-6, atol=1e-6)
    assert (out[1] - out[3]).abs().max() > 1e-3  # guard: without the filter they do
