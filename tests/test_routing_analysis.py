"""Routing analysis (moe_lab.eval.routing) against naive loops: each document routed alone, counts
kept in Python dictionaries."""

import json
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from moe_lab.data.tokenizer import ByteTokenizer
from moe_lab.eval.routing import (
    RouterTap,
    coactivation,
    routed_per_document,
    saturation,
    token_routes,
    top_tokens,
    usage_by_group,
    usage_summary,
)
from tests.test_knnlm import make_docs, make_store
from tests.tiny import MOE, tiny_model


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    store = make_store(tmp_path_factory.mktemp("routing"), make_docs(12, 0, (3, 20)), "valid")
    model = tiny_model(*MOE, "model.moe.num_experts=6", "model.moe.top_k=2")
    return model, store, token_routes(model, store, seq_len=48, batch_size=3)


def _alone(model, store):
    """Each document routed by itself: per document, per layer, the [T, K] experts."""
    out, tap = [], RouterTap(model)
    with tap, torch.no_grad():
        for d in range(store.n_docs):
            doc = store.tokens[store.offsets[d] : store.offsets[d + 1] - 1].astype(np.int64)
            layers = [[] for _ in tap.routers]
            for start in range(0, len(doc), 48):  # spans of seq_len, as evaluation cuts them
                model.hidden_states(torch.from_numpy(doc[start : start + 48])[None])
                for chunks, idx in zip(layers, tap.pop(), strict=True):
                    chunks.append(idx.numpy())
            out.append([np.concatenate(c) for c in layers])
    return out


def test_packed_routes_equal_each_document_routed_alone(routed):
    model, store, routes = routed
    alone = _alone(model, store)
    for d, per_layer in enumerate(alone):
        mine = routes.indices[:, routes.docs == d]
        for layer, idx in enumerate(per_layer):
            assert np.array_equal(np.sort(mine[layer], 1), np.sort(idx, 1)), (d, layer)


def test_usage_per_group_equals_a_naive_count(routed):
    _, store, routes = routed
    counts = defaultdict(Counter)  # (field, value, layer) -> expert -> assignments
    for i, d in enumerate(routes.docs):
        for g, field in enumerate(store.group_fields):
            value = store.group_values[g][store.group_codes[d, g]]
            for layer in range(routes.indices.shape[0]):
                for e in routes.indices[layer, i]:
                    counts[field, value, layer][int(e)] += 1
    usage = usage_by_group(routed_per_document(routes, store.n_docs), store)
    for (field, value, layer), c in counts.items():
        total = sum(c.values())
        expected = [c[e] / total for e in range(routes.num_experts)]
        assert usage[field][value][layer] == pytest.approx(expected, abs=1e-12)
    summary = usage_summary(routed_per_document(routes, store.n_docs))
    for s in summary:
        assert sum(s["share"]) == pytest.approx(1.0)
        assert s["entropy_bits"] <= s["max_entropy_bits"] + 1e-12


def test_coactivation_and_top_tokens_equal_naive_counts(routed):
    _, _, routes = routed
    E = routes.num_experts
    co = coactivation(routes)
    for layer, idx in enumerate(routes.indices):
        chosen, pairs = Counter(), Counter()
        for row in idx:
            for i in row:
                chosen[int(i)] += 1
                for j in row:
                    if i != j:
                        pairs[int(i), int(j)] += 1
        for i in range(E):
            for j in range(E):
                expected = pairs[i, j] / chosen[i] if chosen[i] and i != j else 0.0
                assert co[layer, i, j] == pytest.approx(expected)
    best = top_tokens(routes, ByteTokenizer(), n=3, min_count=2)
    layer, expert = 0, 1
    assert best[layer][expert]
    for entry in best[layer][expert]:
        rows = routes.indices[layer][routes.tokens == entry["id"]]
        assert entry["count"] == len(rows) >= 2
        assert entry["share"] == pytest.approx((rows == expert).sum() / rows.size)
        assert entry["text"] == (chr(entry["id"]) if entry["id"] < 128 else f"<{entry['id']}>")


def test_saturation_of_a_checkpoint_with_itself_is_one(routed):
    model, store, routes = routed
    assert saturation(routes, routes) == 1.0
    other = token_routes(tiny_model(*MOE, "model.moe.num_experts=6", "model.moe.top_k=2", seed=1),
                         store, seq_len=48, batch_size=3)  # fmt: skip
    naive = np.mean([
        len(set(a) & set(b)) / 2
        for la, lb in zip(other.indices, routes.indices, strict=True)
        for a, b in zip(la, lb, strict=True)
    ])  # fmt: skip
    assert saturation(other, routes) == pytest.approx(naive) and naive < 0.9


def test_evaluation_reports_routing_per_group(routed):
    from moe_lab.eval.evaluate import evaluate

    model, store, routes = routed
    report = evaluate(model, store, seq_len=48, batch_size=5)["routing"]
    routed_docs = routed_per_document(routes, store.n_docs)
    assert report["groups"] == usage_by_group(routed_docs, store)
    assert report["layers"] == usage_summary(routed_docs)
    assert set(report["groups"]) == {"domain", "security_domain"}
    dense = tiny_model()
    assert "routing" not in evaluate(dense, store, seq_len=48, batch_size=5)


def test_the_routing_command_writes_numbers_and_figures(tmp_path, capsys):
    from moe_lab import cli
    from moe_lab.store.checkpoint import save_checkpoint
    from tests.tiny import write_run

    run = tmp_path / "run"
    write_run(run, *MOE)  # step 1
    final = tiny_model(*MOE, seed=1)
    save_checkpoint(run / "checkpoints", 2, final, None, {"step": 2}, keep=2)
    assert cli.main(["routing", str(run), "--max-tokens", "20000"]) == 0
    report = json.loads((run / "routing" / "routing.json").read_text())
    assert report["saturation"]["steps"] == [1, 2]
    assert report["saturation"]["values"][1] == 1.0 > report["saturation"]["values"][0]
    assert report["tokens"] >= 20000 and len(report["layers"]) == 2
    assert len(report["groups"]["domain"]) >= 4  # documents sampled across the whole set
    for name in ("usage-domain.png", "usage-lang.png", "coactivation.png", "saturation.png"):
        assert (run / "routing" / name).stat().st_size > 0
    assert "saturation (share of the final top-k already chosen): step 1:" in (
        capsys.readouterr().out
    )
    dense = tmp_path / "dense"
    write_run(dense)
    assert cli.main(["routing", str(dense)]) == 2
    assert "is a dense model" in capsys.readouterr().err
