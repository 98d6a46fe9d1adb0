"""Few-shot multiple choice: accuracies equal a naive item-by-item loop over the model's forward
pass, priming is seeded and never the item, long prompts lose priming only, bad tasks are refused,
and the corpus cloze task exists offline."""

import json

import numpy as np
import pytest

from moe_lab.data.tokenizer import ByteTokenizer
from moe_lab.eval.fewshot import TaskFormat, choice_logliks, corpus_cloze, evaluate_task, load_task
from moe_lab.eval.scoring import TransformerScorer
from tests.conftest import write_jsonl
from tests.tiny import MOE, naive_logprobs, tiny_model

TOK = ByteTokenizer()
WORDS = "cat dog sun sea red blue one two".split()


def _records(n=12):
    rng = np.random.default_rng(0)
    return [
        {
            "query": f"Q{i}: {' '.join(rng.choice(WORDS, 3))} ->",
            "choices": [" ".join(rng.choice(WORDS, 1 + j % 3)) for j in range(3)],
            "label": int(rng.integers(3)),
            "domain": ["animals", "colours"][i % 2],
            "lang": ["en", "en", "de"][i % 3],
        }
        for i in range(n)
    ]


def _naive(model, records, shots, seed):
    """Item by item: rebuild the prompt by hand (the same seeded priming), score each choice with
    its own forward pass, pick the argmax of the sum and of the sum per byte."""
    acc, acc_norm, logliks = [], [], []
    for i, r in enumerate(records):
        rng = np.random.default_rng([seed, i])
        others = [j for j in range(len(records)) if j != i]
        picked = [others[k] for k in rng.choice(len(others), size=shots, replace=False)]
        prime = "".join(
            f"{records[j]['query']} {records[j]['choices'][records[j]['label']]}\n\n"
            for j in picked
        )
        lls, per_byte = [], []
        for c in r["choices"]:
            cont = TOK.encode(" " + c)
            seq = [TOK.bos_id, *TOK.encode(prime + r["query"]), *cont]
            ll = naive_logprobs(model, seq)[-len(cont) :].sum()
            lls.append(ll)
            per_byte.append(ll / len(cont))
        acc.append(np.argmax(lls) == r["label"])
        acc_norm.append(np.argmax(per_byte) == r["label"])
        logliks.append(lls)
    return np.array(acc), np.array(acc_norm), logliks


@pytest.mark.parametrize(("kind", "shots"), [([], 0), ([], 3), (MOE, 2)], ids=str)
def test_accuracies_equal_a_naive_item_by_item_loop_overall_and_per_group(kind, shots):
    model = tiny_model(*kind, "model.max_seq_len=256")  # room for every priming
    records = _records()
    scorer = TransformerScorer(model, TOK, batch_size=5)
    result = evaluate_task(scorer, records, shots, seed=3)
    acc, acc_norm, logliks = _naive(model, records, shots, seed=3)
    got, truncated = choice_logliks(scorer, records, shots, seed=3)
    np.testing.assert_allclose(np.array(got), np.array(logliks), atol=1e-4, rtol=1e-5)
    assert 0 < acc.mean() < 1 and (acc != acc_norm).any()  # the two metrics disagree somewhere
    assert result["overall"] == {"acc": acc.mean(), "acc_norm": acc_norm.mean(), "n": 12}
    assert result["truncated"] == 0 and result["shots"] == shots
    assert set(result["groups"]) == {"domain", "lang"}
    de = np.array([r["lang"] == "de" for r in records])
    assert result["groups"]["lang"]["de"] == {
        "acc": acc[de].mean(),
        "acc_norm": acc_norm[de].mean(),
        "n": 4,
    }


def test_priming_is_seeded_and_never_the_item_itself():
    from moe_lab.eval.fewshot import _priming

    records = _records(5)
    fmt = TaskFormat()
    for i, r in enumerate(records):
        prime = _priming(records, i, 4, seed=0, fmt=fmt)
        assert r["query"] not in prime  # 4 shots of 5 items: every other item, never this one
        assert all(o["query"] in prime for o in records if o is not r)
    assert _priming(records, 0, 2, 0, fmt) == _priming(records, 0, 2, 0, fmt)
    assert {_priming(records, 0, 2, s, fmt) for s in range(6)} != {_priming(records, 0, 2, 0, fmt)}


def test_a_long_priming_loses_its_oldest_tokens_never_the_item():
    model = tiny_model()  # context: 96 tokens
    records = _records()
    scorer = TransformerScorer(model, TOK)
    logliks, truncated = choice_logliks(scorer, records, shots=5, seed=0)
    assert truncated == len(records)  # 5 primings of ~20 bytes cannot fit in 96
    # item 0 by hand: BOS, the last bytes of its priming that fit, then the whole item
    r = records[0]
    rng = np.random.default_rng([0, 0])
    picked = [records[1 + k] for k in rng.choice(11, size=5, replace=False)]
    prime = TOK.encode("".join(f"{p['query']} {p['choices'][p['label']]}\n\n" for p in picked))
    query = TOK.encode(r["query"])
    longest = max(len(TOK.encode(" " + c)) for c in r["choices"])
    keep = prime[len(prime) - (96 - len(query) - longest) :]
    lls = []
    for c in r["choices"]:
        cont = TOK.encode(" " + c)
        lls.append(naive_logprobs(model, [TOK.bos_id, *keep, *query, *cont])[-len(cont) :].sum())
    np.testing.assert_allclose(logliks[0], lls, atol=1e-4, rtol=1e-5)
    assert evaluate_task(scorer, records, shots=5)["truncated"] == len(records)
    records[0]["query"] = "x" * 95
    with pytest.raises(ValueError, match="item 0: its query and longest choice take"):
        evaluate_task(scorer, records)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ({"query": "q", "label": 0}, "needs a list of at least 2 'choices'"),
        ({"query": "q", "choices": ["a"], "label": 0}, "at least 2"),
        ({"query": "q", "choices": ["a", "b"], "label": 2}, r"index into the 2 choices, got 2"),
        ({"query": "q", "choices": ["a", "b"], "label": True}, "got True"),
        ({"choices": ["a", "b"], "label": 0}, "needs a string field 'query'"),
    ],
)
def test_bad_records_are_refused_naming_the_line(tmp_path, line, match):
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"query": "ok", "choices": ["a", "b"], "label": 1}, line]
    )
    with pytest.raises(ValueError, match=f"t.jsonl:2: .*{match}"):
        load_task(path)


def test_missing_file_shots_and_custom_fields(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(tmp_path / "none.jsonl")
    rec = [{"q": f"n{i}", "opts": ["a", "b"], "y": i % 2} for i in range(3)]
    fmt = TaskFormat(query_field="q", choices_field="opts", label_field="y")
    records = load_task(write_jsonl(tmp_path / "c.jsonl", rec), fmt)
    assert records == rec
    scorer = TransformerScorer(tiny_model(), TOK)
    assert evaluate_task(scorer, records, fmt=fmt)["overall"]["n"] == 3
    with pytest.raises(ValueError, match=r"shots must be in \[0, 2\]"):
        evaluate_task(scorer, records, shots=3, fmt=fmt)


def test_corpus_cloze_is_a_fair_offline_task_with_group_fields():
    records = corpus_cloze(seed=0)
    assert len(records) >= 100 and records == corpus_cloze(seed=0)
    assert {r["lang"] for r in records} >= {"en", "de", "zh"}
    for r in records:
        assert len(set(r["choices"])) == 4 and r["query"] and 0 <= r["label"] < 4
        assert r["query"] + " " + r["choices"][r["label"]] not in json.dumps(r["choices"])
    labels = np.bincount([r["label"] for r in records], minlength=4)
    assert labels.min() > len(records) / 8  # the answer's position is not a giveaway
    longest = max(
        len(r["query"].encode()) + max(len(c.encode()) for c in r["choices"]) for r in records
    )
    assert longest <= 160 + 48  # fits a byte-level model of 256 positions, in every language
    assert load_task("corpus-cloze") == records
    easy = load_task("corpus-cloze-easy")
    assert easy == corpus_cloze(similar=False) and len(easy) >= 100

    def foreign(task):  # English items with a non-ASCII choice: mostly other languages' passages
        return sum(not all(c.isascii() for c in r["choices"]) for r in task if r["lang"] == "en")

    assert foreign(records) < 10 < 30 < foreign(easy)
