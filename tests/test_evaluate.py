import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_lab import ModelConfig, build_model
from moe_lab.data.documents import load_documents
from moe_lab.data.packing import build_store
from moe_lab.data.tokenizer import ByteTokenizer
from moe_lab.eval.evaluate import evaluate


def test_per_group_evaluation_equals_scoring_each_document_alone(lang_files, tmp_path):
    ds = load_documents([str(lang_files[1])], "text", ["lang"])
    store = build_store(ds, ByteTokenizer(), "text", ["lang"], tmp_path / "cache")
    model = build_model(ModelConfig(dim=32, n_heads=2, ffn_hidden=64, vocab_size=260, init_std=0.2))
    seq_len = 48  # shorter than most documents: they are scored in consecutive spans
    report = evaluate(model, store, seq_len=seq_len, batch_size=3)

    per_group = {}
    with torch.no_grad():
        for d in range(store.n_docs):
            doc = torch.from_numpy(
                store.tokens[store.offsets[d] : store.offsets[d + 1]].astype(int)
            )
            nll, n = 0.0, 0
            for start in range(0, len(doc) - 1, seq_len):  # each span alone, no packing at all
                piece = doc[start : start + seq_len + 1]
                logits = model(piece[None, :-1]).logits[0]
                nll += F.cross_entropy(logits, piece[1:], reduction="sum").item()
                n += len(piece) - 1
            lang = store.group_values[0][store.group_codes[d, 0]]
            acc = per_group.setdefault(lang, [0.0, 0, 0])
            acc[0], acc[1], acc[2] = acc[0] + nll, acc[1] + n, acc[2] + int(store.n_bytes[d])
    for lang, (nll, n, n_bytes) in per_group.items():
        got = report["groups"]["lang"][lang]
        assert got["tokens"] == n and got["bytes"] == n_bytes
        assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
        assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    total = sum(v[0] for v in per_group.values()) / sum(v[1] for v in per_group.values())
    assert report["overall"]["loss"] == pytest.approx(total, rel=1e-5)
    assert report["overall"]["documents"] == store.n_docs == len(ds)
    assert np.isfinite(report["overall"]["perplexity"])


def test_a_capped_evaluation_scores_whole_documents_only(lang_files, tmp_path):
    ds = load_documents([str(lang_files[1])], "text", ["lang"])
    store = build_store(ds, ByteTokenizer(), "text", ["lang"], tmp_path / "cache")
    model = build_model(ModelConfig(dim=32, n_heads=2, ffn_hidden=64, vocab_size=260, init_std=0.2))
    full = evaluate(model, store, seq_len=48, batch_size=3)["overall"]
    capped = evaluate(model, store, seq_len=48, batch_size=3, max_batches=2)["overall"]
    assert 0 < capped["documents"] < full["documents"]
    # bytes as tokens: each whole document is scored on its bytes and EOS
    assert capped["tokens"] == capped["bytes"] + capped["documents"]
    assert full["tokens"] == full["bytes"] + full["documents"]


def test_validation_needs_no_training_data_unless_cut_from_it(lang_files, tmp_path):
    from moe_lab.config import load_config
    from moe_lab.data.documents import DataError
    from moe_lab.eval.evaluate import validation_store

    gone = str(tmp_path / "moved-away.jsonl")  # a run's training file, no longer there
    cfg = load_config(
        overrides=[f"data.train_files=[{gone}]", f"data.valid_files=[{lang_files[1]}]"]
    )
    store = validation_store(cfg, ByteTokenizer())
    assert store.n_docs == len(load_documents([str(lang_files[1])], "text", []))
    cut = load_config(overrides=[f"data.train_files=[{gone}]"])  # valid_fraction of the train files
    with pytest.raises((DataError, FileNotFoundError), match="moved-away"):
        validation_store(cut, ByteTokenizer())
