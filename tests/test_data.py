import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl

from moe_lab.config import load_config
from moe_lab.data.documents import DataError, build_tokenizer, load_documents, load_splits
from moe_lab.data.packing import IGNORE, TrainBatches, build_store, eval_rows
from moe_lab.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe


def test_jsonl_parquet_text_and_gzip_load_alike(tmp_path):
    records = [{"text": f"doc {i}", "domain": "a" if i % 2 else "b"} for i in range(5)]
    write_jsonl(tmp_path / "d.jsonl", records)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    load_documents([str(tmp_path / "d.jsonl")]).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("a whole file\n\nis one document\n")
    for name in ("d.jsonl", "d.jsonl.gz"):
        ds = load_documents([str(tmp_path / name)], "text", ["domain"])
        assert ds["text"] == [r["text"] for r in records] and ds.column_names == ["text", "domain"]
    assert load_documents([str(tmp_path / "d.parquet")])["text"] == [r["text"] for r in records]
    assert load_documents([str(tmp_path / "d.txt")])["text"] == [
        "a whole file\n\nis one document\n"
    ]


def test_include_keeps_only_listed_values(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": str(i), "lang": v} for i, v in enumerate("abcab")])
    ds = load_documents([str(tmp_path / "d.jsonl")], "text", ["lang"], {"lang": ["a", "c"]})
    assert ds["text"] == ["0", "2", "3"]
    with pytest.raises(DataError, match="no documents left"):
        load_documents([str(tmp_path / "d.jsonl")], "text", ["lang"], {"lang": ["z"]})
    with pytest.raises(DataError, match="not in data.group_fields"):
        load_documents([str(tmp_path / "d.jsonl")], "text", [], {"lang": ["a"]})


@pytest.mark.parametrize(
    "content, groups, message",
    [
        ("", [], r"no records"),
        ('{"body": "x"}\n', [], r"records have no field 'text' \(data.text_field\)"),
        ('{"text": "a"}\n{"other": 1}\n', [], r"record 2 has no field 'text'"),
        ('{"text": "a"}\n\n{"other": 1}\n', [], r"record 2 has no field"),  # on line 3
        ('{"text": 5}\n', [], r"non-string \(int\) field 'text'"),
        (
            '{"text": "a", "lang": "en"}\n{"text": "b"}\n',
            ["lang"],
            r"record 2 has no field 'lang' \(data.group_fields\)",
        ),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, content, groups, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_documents([str(path)], "text", groups)
    assert "bad.jsonl" in str(info.value)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: invalid UTF-8"):
        load_documents([str(path)])


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type"):
        load_documents([str(tmp_path / "x.csv")])
    with pytest.raises(DataError, match="no data files"):
        load_documents([])


def test_shipped_corpus_has_domains_and_languages():
    cfg = load_config()
    train, valid, groups = load_splits(cfg)
    assert groups == ["domain", "lang"]
    assert len(set(train["domain"])) >= 5 and len(set(train["lang"])) >= 8
    assert set(valid["lang"]) == set(train["lang"])
    assert not set(train["text"]) & set(valid["text"])  # held-out documents


def test_valid_fraction_holds_out_whole_documents(lang_files):
    train_file, _ = lang_files
    cfg = load_config(
        overrides=[
            f"data.train_files=[{train_file}]",
            "data.group_fields=[lang]",
            "data.valid_fraction=0.25",
        ]
    )
    train, valid, _ = load_splits(cfg)
    assert len(train) + len(valid) == 120 and len(valid) == 30


# ---- tokenizers ----------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Grüße, 世界! \n\ttabs"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256 and tok.vocab_size == 259


def test_bpe_trains_saves_and_reloads(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog"] * 50 + ["Grüße 世界"] * 10
    tok = train_bpe(iter(texts), 300)
    assert tok.vocab_size == 300
    ids = tok.encode("the lazy fox, Grüße 世界")
    assert tok.decode(ids) == "the lazy fox, Grüße 世界"
    assert len(ids) < len("the lazy fox, Grüße 世界".encode())  # merges learned
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.encode("the lazy fox") == tok.encode("the lazy fox")
    assert again.fingerprint() == tok.fingerprint()
    assert (again.bos_id, again.eos_id) == (tok.bos_id, tok.eos_id)


def test_sentencepiece_model_loads(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    words = "hello world this is a tiny corpus of plain english words spoken again".split()
    corpus.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 30)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=40,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=3,
        hard_vocab_limit=False,
    )
    tok = load_tokenizer(tmp_path / "sp.model")
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert (tok.bos_id, tok.eos_id) == (1, 2) and 20 <= tok.vocab_size <= 40


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'byte', 'bpe'"):
        load_tokenizer(tmp_path / "missing.json")
    cfg = load_config(
        overrides=["data.tokenizer=bpe", "model.vocab_size=512", "data.bpe_vocab_size=600"]
    )
    with pytest.raises(DataError, match=r"model.vocab_size \(512\) is smaller"):
        build_tokenizer(
            cfg,
            load_documents(
                [
                    str(
                        write_jsonl(
                            tmp_path / "t.jsonl", [{"text": f"word{i} " * 20} for i in range(300)]
                        )
                    )
                ]
            ),
        )


# ---- packing -------------------------------------------------------------------------------------


@pytest.fixture
def store(lang_files, tmp_path):
    ds = load_documents([str(lang_files[0])], "text", ["lang"])
    return build_store(ds, ByteTokenizer(), "text", ["lang"], tmp_path / "cache", sort_by="lang")


def test_store_layout_and_cache_reuse(store, lang_files, tmp_path, monkeypatch):
    ds = load_documents([str(lang_files[0])], "text", ["lang"])
    # the store sorts documents stably by lang
    texts = sorted(zip(ds["lang"], range(len(ds)), ds["text"], strict=True))
    assert store.n_docs == 120 and store.group_values == [["de", "en"]]
    for d, (_, _, text) in enumerate(texts):
        doc = store.tokens[store.offsets[d] : store.offsets[d + 1]]
        assert doc[0] == 256 and doc[-1] == 257 and bytes(doc[1:-1].tolist()).decode() == text
        assert store.n_bytes[d] == len(text.encode())
    monkeypatch.setattr(ByteTokenizer, "encode_batch", lambda *a: pytest.fail("re-tokenized"))
    again = build_store(ds, ByteTokenizer(), "text", ["lang"], tmp_path / "cache", sort_by="lang")
    assert np.array_equal(again.offsets, store.offsets)


def test_train_batches_are_shifted_and_ignore_document_starts(store):
    batch = TrainBatches(store, 32, 4, seed=0).next_batch(doc_ids=True)
    inputs, targets = batch["input_ids"], batch["targets"]
    assert inputs.shape == targets.shape == (4, 32)
    shifted = targets[:, :-1] != IGNORE
    assert (inputs[:, 1:][shifted] == targets[:, :-1][shifted]).all()
    assert ((inputs[:, 1:] == 256) == (targets[:, :-1] == IGNORE)).all()  # BOS is never a target
    starts = inputs == 256
    assert (batch["doc_ids"][:, 1:][starts[:, 1:]] != batch["doc_ids"][:, :-1][starts[:, 1:]]).all()


def test_sampler_resumes_exactly_and_is_seeded(store):
    a = TrainBatches(store, 16, 4, seed=3, sample_by="lang", alpha=0.3)
    for _ in range(7):
        a.next_batch()
    saved = json.loads(json.dumps(a.state_dict()))  # survives JSON, as in a checkpoint
    expected = [a.next_batch()["input_ids"] for _ in range(30)]  # crosses epochs
    b = TrainBatches(store, 16, 4, seed=3, sample_by="lang", alpha=0.3)
    b.load_state_dict(saved)
    assert all((b.next_batch()["input_ids"] == e).all() for e in expected)
    c = TrainBatches(store, 16, 4, seed=3, sample_by="lang", alpha=0.3)
    c.load_state_dict(saved, restore_rng=False)
    assert not all((c.next_batch()["input_ids"] == e).all() for e in expected)
    other = TrainBatches(store, 32, 4, seed=3, sample_by="lang", alpha=0.3)  # fewer, longer blocks
    with pytest.raises(ValueError, match="the training data changed since the checkpoint"):
        other.load_state_dict(saved)


def test_temperature_sampling_matches_n_to_the_alpha(store):
    sizes = np.array([end - start for _, start, end in store.doc_range("lang")], dtype=float)
    for alpha in (0.0, 0.3, 1.0):
        sampler = TrainBatches(store, 8, 50, seed=1, sample_by="lang", alpha=alpha)
        expected = sizes**alpha / (sizes**alpha).sum()
        np.testing.assert_allclose(sampler.probs, expected)
        for _ in range(40):
            sampler.next_batch()
        draws = np.array(
            [
                e * n + p
                for e, n, p in zip(sampler.epoch, sampler.n_blocks, sampler.pos, strict=True)
            ]
        )
        np.testing.assert_allclose(draws / draws.sum(), expected, atol=0.03)  # 2000 draws


def test_subset_group_with_too_little_text_is_refused(store):
    with pytest.raises(ValueError, match="fewer than one block"):
        TrainBatches(store, 10_000, 2, seed=0, sample_by="lang")


def test_eval_rows_score_every_token_once_within_its_document(store):
    seen = np.zeros(store.n_docs, dtype=np.int64)
    for batch in eval_rows(store, seq_len=50, batch_size=3):
        docs, spans, targets = batch["doc_index"], batch["doc_ids"], batch["targets"]
        same_span = spans[:, :, None] == spans[:, None, :]
        assert ((docs[:, :, None] == docs[:, None, :]) | ~same_span).all()  # a span is one doc
        for d in docs[targets != IGNORE].unique().tolist():
            doc = store.tokens[store.offsets[d] : store.offsets[d + 1]]
            mine = (docs == d) & (targets != IGNORE)
            seen[d] += mine.sum()
            assert set(targets[mine].tolist()) <= set(doc[1:].tolist())
    assert np.array_equal(seen, np.diff(store.offsets) - 1)  # every token but BOS, once


def test_load_splits_rejects_sample_by_outside_groups(lang_files):
    cfg = load_config(overrides=[f"data.train_files=[{lang_files[0]}]", "data.sample_by=lang"])
    with pytest.raises(DataError, match="not a group field"):
        load_splits(cfg)
    assert Path(lang_files[0]).exists()
