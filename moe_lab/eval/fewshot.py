"""Few-shot multiple-choice scoring by log-likelihood, overall and per group value.

A task is a local jsonl file, one item per line::

    {"query": "The capital of France is", "choices": ["Paris", "Rome"], "label": 0, "domain": "geo"}

(field names configurable: :class:`TaskFormat`). Any other field whose value is a string in every
record is a group field: accuracy is also reported per value of it (``domain``, ``lang``, ...).

Each choice is scored as the continuation ``target_delimiter + choice`` of the prompt
``BOS + priming + query``; with ``shots=k`` the priming is k other items of the task, chosen with a
seeded generator (never the item itself), each written ``query + delimiter + answer`` and followed
by ``fewshot_delimiter``. Two accuracies, as lm-evaluation-harness reports them: ``acc`` picks the
choice with the highest summed log-likelihood, ``acc_norm`` the highest log-likelihood per UTF-8
byte of the continuation (lm-eval divides by characters; the two agree on ASCII). A prompt longer
than the model's context loses tokens from the left of its priming, never from the item.

:func:`corpus_cloze` builds a task that needs no hub: the shipped corpus' held-out documents cut
at a word, the true continuation against continuations of other documents.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_lab.data.documents import CORPUS_DIR
from moe_lab.eval.scoring import Scorer, encode_pair

__all__ = [
    "CORPUS_CLOZE",
    "TaskFormat",
    "choice_logliks",
    "corpus_cloze",
    "evaluate_task",
    "load_task",
]

# task names that build corpus_cloze() instead of reading a file
CORPUS_CLOZE = {"corpus-cloze": {"similar": True}, "corpus-cloze-easy": {"similar": False}}


@dataclass
class TaskFormat:
    """The fields of a task's records and how prompts are written."""

    query_field: str = "query"
    choices_field: str = "choices"
    label_field: str = "label"
    target_delimiter: str = " "  # between a query and a choice
    fewshot_delimiter: str = "\n\n"  # after each priming example


def load_task(path: str | Path, fmt: TaskFormat | None = None) -> list[dict]:
    """The validated records of a jsonl task, or of :func:`corpus_cloze` for ``"corpus-cloze"``
    (distractors of the same domain and language) or ``"corpus-cloze-easy"`` (of any document).

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the line of a record that is not an object, lacks the query or choices,
            has fewer than two choices, or a label that is not an index into them.
    """
    fmt = fmt or TaskFormat()
    if str(path) in CORPUS_CLOZE and not Path(path).exists():
        return corpus_cloze(**CORPUS_CLOZE[str(path)])
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(r, dict) or not isinstance(r.get(fmt.query_field), str):
            raise ValueError(f"{where}: needs a string field {fmt.query_field!r}")
        choices = r.get(fmt.choices_field)
        if not isinstance(choices, list) or len(choices) < 2:
            raise ValueError(f"{where}: needs a list of at least 2 {fmt.choices_field!r}")
        if not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: every choice must be a non-empty string")
        label = r.get(fmt.label_field)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise ValueError(
                f"{where}: {fmt.label_field!r} must be an index into the {len(choices)} "
                f"choices, got {label!r}"
            )
        records.append(r)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _group_fields(records: list[dict], fmt: TaskFormat) -> list[str]:
    own = {fmt.query_field, fmt.choices_field, fmt.label_field}
    keys = [k for k in records[0] if k not in own]
    return [k for k in keys if all(isinstance(r.get(k), str) for r in records)]


def _priming(records: list[dict], i: int, shots: int, seed: int, fmt: TaskFormat) -> str:
    if shots == 0:
        return ""
    # One generator per item: an item's priming does not depend on which other items are scored.
    rng = np.random.default_rng([seed, i])
    others = rng.choice(len(records) - 1, size=shots, replace=False)
    picked = [records[j + (j >= i)] for j in others]  # skip the item itself
    return "".join(
        r[fmt.query_field]
        + fmt.target_delimiter
        + r[fmt.choices_field][r[fmt.label_field]]
        + fmt.fewshot_delimiter
        for r in picked
    )


def _accuracy(correct: np.ndarray, correct_norm: np.ndarray) -> dict:
    return {
        "acc": float(correct.mean()),
        "acc_norm": float(correct_norm.mean()),
        "n": int(len(correct)),
    }


def choice_logliks(
    scorer: Scorer,
    records: list[dict],
    shots: int = 0,
    seed: int = 0,
    fmt: TaskFormat | None = None,
    progress: bool = False,
) -> tuple[list[np.ndarray], int]:
    """Summed log-likelihood of every choice of every item, after its (primed) prompt.

    Returns:
        ``([n_choices] float64 array per item, number of items whose priming was truncated)``.

    Raises:
        ValueError: ``shots`` not below the number of items, or an item (query and its longest
            choice) that does not fit the model's context even without priming.
    """
    fmt = fmt or TaskFormat()
    if not 0 <= shots < len(records):
        raise ValueError(f"shots must be in [0, {len(records) - 1}] for this task, got {shots}")
    tok = scorer.tokenizer
    seqs, conts, truncated = [], [], 0
    for i, r in enumerate(records):
        pairs = [
            encode_pair(tok, r[fmt.query_field], fmt.target_delimiter + c)
            for c in r[fmt.choices_field]
        ]
        item = max(len(ctx) + len(cont) for ctx, cont in pairs)
        room = scorer.max_len - item  # BOS + priming + item <= max_len + 1 tokens
        if room < 0:
            raise ValueError(
                f"item {i}: its query and longest choice take {item + 1} tokens with BOS, more "
                f"than the model's context of {scorer.max_len + 1} scored tokens"
            )
        priming = _priming(records, i, shots, seed, fmt)
        primed = tok.encode(priming) if priming else []
        if len(primed) > room:  # every choice keeps the same priming: they stay comparable
            primed, truncated = primed[len(primed) - room :], truncated + 1  # drop the oldest
        seqs += [[tok.bos_id, *primed, *ctx, *cont] for ctx, cont in pairs]
        conts.append([len(cont) for _, cont in pairs])
    scores = iter(scorer.token_logprobs(seqs, progress=progress))
    logliks = [np.array([next(scores)[-n:].sum(dtype=np.float64) for n in item]) for item in conts]
    return logliks, truncated


def evaluate_task(
    scorer: Scorer,
    records: list[dict],
    shots: int = 0,
    seed: int = 0,
    fmt: TaskFormat | None = None,
    progress: bool = False,
) -> dict:
    """Accuracy of ``scorer`` on multiple-choice ``records`` (see :func:`load_task`).

    Returns:
        ``{"shots", "seed", "n", "truncated", "overall": {acc, acc_norm, n},
        "groups": {field: {value: {acc, acc_norm, n}}}}``: ``truncated`` counts the items whose
        priming lost tokens to fit the context.

    Raises:
        ValueError: as :func:`choice_logliks`.
    """
    fmt = fmt or TaskFormat()
    logliks, truncated = choice_logliks(scorer, records, shots, seed, fmt, progress)
    correct, correct_norm = [], []
    for r, ll in zip(records, logliks, strict=True):
        n_bytes = [len((fmt.target_delimiter + c).encode("utf-8")) for c in r[fmt.choices_field]]
        correct.append(int(ll.argmax()) == r[fmt.label_field])
        correct_norm.append(int((ll / np.array(n_bytes)).argmax()) == r[fmt.label_field])
    correct, correct_norm = np.array(correct), np.array(correct_norm)
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for field in _group_fields(records, fmt):
        values = np.array([r[field] for r in records])
        for value in sorted(set(values.tolist())):
            m = values == value
            groups[field][value] = _accuracy(correct[m], correct_norm[m])
    return {
        "shots": shots,
        "seed": seed,
        "n": len(records),
        "truncated": truncated,
        "overall": _accuracy(correct, correct_norm),
        "groups": dict(groups),
    }


def _word_start(text: str, at: int, reach: int = 16) -> int:
    """The first word start at or after ``at``, within ``reach`` characters; else ``at`` (text
    without spaces, such as Chinese, is cut anywhere)."""
    for i in range(at, min(at + reach, len(text)) + 1):
        if i in (0, len(text)) or text[i - 1].isspace():
            return i
    return at


def _word_end(text: str, at: int, reach: int = 16) -> int:
    """The last word end at or before ``at``, within ``reach`` characters; else ``at``."""
    for i in range(at, max(at - reach, 0), -1):
        if i == len(text) or text[i].isspace():
            return i
    return at


def _utf8_reach(text: str, start: int, n_bytes: int, step: int) -> int:
    """The index ``n_bytes`` of UTF-8 away from ``start``, forwards (``step=1``) or backwards."""
    end, used = start, 0
    while 0 <= end + min(step, 0) < len(text):
        used += len(text[end + min(step, 0)].encode("utf-8"))
        if used > n_bytes:
            break
        end += step
    return end


def corpus_cloze(
    n_choices: int = 4,
    context_bytes: int = 160,
    continuation_bytes: int = 48,
    seed: int = 0,
    split: str = "valid",
    similar: bool = True,
) -> list[dict]:
    """A cloze task from the shipped corpus' held-out documents, one item per document.

    Each document is cut at a seeded position; the query is the ``context_bytes`` (UTF-8) before
    the cut, the answer the ``continuation_bytes`` after it, both trimmed to word boundaries where
    the text has spaces; so an item fits a byte-level model of 256 positions in any language.
    With ``similar``, distractors are passages of other documents of the same domain and language
    where there are enough, else of the same language, else of any; without, of any other
    document (an easier task, which models too small for the first can separate by domain and
    language). Each record carries the document's ``domain`` and ``lang`` as group fields.
    """
    import gzip

    with gzip.open(CORPUS_DIR / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    rng = np.random.default_rng(seed)

    def passage(text: str) -> tuple[str, str]:  # (context, continuation), each within budget
        lo, hi = min(context_bytes, len(text) // 2), max(1, len(text) - continuation_bytes)
        cut = _word_start(text, int(rng.integers(lo, max(lo + 1, hi))))
        first = _word_start(text, _utf8_reach(text, cut, context_bytes, -1))
        end = _word_end(text, _utf8_reach(text, cut, continuation_bytes, 1))
        return text[min(first, cut) : cut].strip(), text[cut : max(end, cut)].strip()

    cut = [passage(d["text"]) for d in docs]
    records = []
    for i, d in enumerate(docs):
        pool = [j for j in range(len(docs)) if j != i]
        for keys in (("domain", "lang"), ("lang",)) if similar else ():  # most similar, if enough
            same = [j for j in pool if all(docs[j][k] == d[k] for k in keys)]
            if len(same) >= n_choices - 1:
                pool = same
                break
        others = [cut[j][1] for j in rng.choice(pool, size=n_choices - 1, replace=False)]
        label = int(rng.integers(n_choices))
        choices = [*others[:label], cut[i][1], *others[label:]]
        if not cut[i][0] or len(set(choices)) < n_choices or not all(choices):
            continue  # a document too short to cut, or two identical passages: no fair item
        records.append(
            {
                "query": cut[i][0],
                "choices": choices,
                "label": label,
                "domain": d["domain"],
                "lang": d["lang"],
            }
        )
    return records
