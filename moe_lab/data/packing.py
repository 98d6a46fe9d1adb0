"""Token arrays: documents become ``[BOS, tokens..., EOS]`` packed into one memory-mapped stream per
split, cached on disk; training draws fixed-length blocks in a seeded, resumable, group-aware order;
evaluation scores whole documents, each in its own attention span.

Shapes: N = tokens in a split, D = documents, G = group fields, T = sequence length, B = batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from moe_lab.data.tokenizer import Tokenizer
from moe_lab.nn.losses import IGNORE_INDEX

__all__ = ["IGNORE", "TokenStore", "TrainBatches", "build_store", "cache_root", "eval_rows"]

IGNORE = IGNORE_INDEX  # target id that the loss skips


@dataclass
class TokenStore:
    """One split, tokenized: documents back to back, with their sizes and group values."""

    tokens: np.ndarray  # [N] uint16 or uint32, memory-mapped
    offsets: np.ndarray  # [D + 1] int64: document d is tokens[offsets[d]:offsets[d + 1]]
    n_bytes: np.ndarray  # [D] int64 UTF-8 bytes of each document's text (for bits per byte)
    group_codes: np.ndarray  # [D, G] int32 index into group_values[g]
    group_fields: list[str]
    group_values: list[list[str]]
    bos_id: int
    fingerprint: str  # hash of the tokens: a checkpoint records it, a resume compares it

    @property
    def n_docs(self) -> int:
        return len(self.n_bytes)

    def doc_range(self, field: str | None) -> list[tuple[str, int, int]]:
        """``(value, first_token, end_token)`` per value of ``field``; its documents are contiguous
        because the store was sorted by it. ``None``: one range covering everything."""
        if field is None:
            return [("all", 0, int(self.offsets[-1]))]
        g = self.group_fields.index(field)
        codes = self.group_codes[:, g]
        if np.any(np.diff(codes) < 0):
            raise ValueError(f"token store is not sorted by {field!r}")
        ranges = []
        for code, value in enumerate(self.group_values[g]):
            docs = np.flatnonzero(codes == code)
            if len(docs):
                ranges.append((value, int(self.offsets[docs[0]]), int(self.offsets[docs[-1] + 1])))
        return ranges


def cache_root(configured: str | None) -> Path:
    if configured:
        return Path(configured)
    return Path(os.environ.get("MOE_LAB_CACHE", Path.home() / ".cache" / "moe_lab"))


def _store_key(ds: datasets.Dataset, tokenizer: Tokenizer, text_field, group_fields, sort_by):
    spec = {
        "dataset": ds._fingerprint,  # datasets' content/lineage hash: files, filters, splits
        "rows": len(ds),
        "tokenizer": tokenizer.fingerprint(),
        "text_field": text_field,
        "group_fields": list(group_fields),
        "sort_by": sort_by,
        "format": 1,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def _content_hash(tokens_file: Path) -> str:
    """The fingerprint of a store built before stores recorded theirs."""
    hasher = hashlib.blake2b(digest_size=16)
    with open(tokens_file, "rb") as f:
        while chunk := f.read(1 << 24):
            hasher.update(chunk)
    return hasher.hexdigest()


def _open_store(path: Path) -> TokenStore:
    meta = json.loads((path / "meta.json").read_text())
    fingerprint = meta.get("fingerprint") or _content_hash(path / "tokens.bin")
    return TokenStore(
        fingerprint=fingerprint,
        tokens=np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r"),
        offsets=np.load(path / "offsets.npy"),
        n_bytes=np.load(path / "n_bytes.npy"),
        group_codes=np.load(path / "group_codes.npy"),
        group_fields=meta["group_fields"],
        group_values=meta["group_values"],
        bos_id=meta["bos_id"],
    )


def build_store(
    ds: datasets.Dataset,
    tokenizer: Tokenizer,
    text_field: str,
    group_fields: list[str],
    cache: Path,
    sort_by: str | None = None,
) -> TokenStore:
    """Tokenize ``ds`` into a cached :class:`TokenStore` (reused when inputs are unchanged).

    Documents are sorted (stably) by ``sort_by`` so each of its values owns a contiguous range.
    The store is written into a temporary directory and renamed into place, so concurrent or
    interrupted builds never leave a partial store behind.
    """
    path = cache / "tokens" / _store_key(ds, tokenizer, text_field, group_fields, sort_by)
    if (path / "meta.json").is_file():
        return _open_store(path)
    values = [sorted(set(ds[g])) for g in group_fields]
    codes = (
        np.stack(
            [
                np.searchsorted(v, np.array(ds[g], dtype=object).astype(str))
                for g, v in zip(group_fields, values, strict=True)
            ],
            axis=1,
        ).astype(np.int32)
        if group_fields
        else np.zeros((len(ds), 0), np.int32)
    )
    if sort_by is not None:
        order = np.argsort(codes[:, group_fields.index(sort_by)], kind="stable")
        ds, codes = ds.select(order), codes[order]
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
    try:
        offsets, n_bytes = [0], []
        hasher = hashlib.blake2b(digest_size=16)  # of the bytes written: _content_hash's value
        with open(tmp / "tokens.bin", "wb") as f:
            bar = tqdm(total=len(ds), desc="tokenizing", unit="doc", disable=None, leave=False)
            for batch in ds.iter(batch_size=1000):
                texts = batch[text_field]
                for text, ids in zip(texts, tokenizer.encode_batch(texts), strict=True):
                    doc = np.array([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=dtype)
                    f.write(doc.tobytes())
                    hasher.update(doc.tobytes())
                    offsets.append(offsets[-1] + len(doc))
                    n_bytes.append(len(text.encode("utf-8")))
                bar.update(len(texts))
            bar.close()
        np.save(tmp / "offsets.npy", np.array(offsets, dtype=np.int64))
        np.save(tmp / "n_bytes.npy", np.array(n_bytes, dtype=np.int64))
        np.save(tmp / "group_codes.npy", codes)
        meta = {
            "dtype": np.dtype(dtype).name,
            "group_fields": list(group_fields),
            "group_values": values,
            "bos_id": tokenizer.bos_id,
            "n_tokens": offsets[-1],
            "fingerprint": hasher.hexdigest(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))  # written last: marks the store complete
        try:
            tmp.rename(path)
        except OSError:  # another process finished the same store first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open_store(path)


class TrainBatches:
    """An endless, seeded stream of training blocks of ``T + 1`` tokens, resumable exactly.

    Each group value of ``sample_by`` (or the whole store) is cut into non-overlapping blocks,
    visited in a fresh seeded permutation every epoch. Each sequence of a batch first draws its
    group with probability ``p_g ~ n_g ** alpha`` (XGLM's temperature sampling; ``n_g`` = tokens),
    from a generator whose state, with every group's epoch and position, is :meth:`state_dict`.
    """

    def __init__(
        self,
        store: TokenStore,
        seq_len: int,
        batch_size: int,
        seed: int,
        sample_by: str | None = None,
        alpha: float = 1.0,
    ) -> None:
        self.store, self.seq_len, self.batch_size, self.seed = store, seq_len, batch_size, seed
        self.groups = store.doc_range(sample_by)
        self.n_blocks = [(end - start - 1) // seq_len for _, start, end in self.groups]
        for (value, start, end), n in zip(self.groups, self.n_blocks, strict=True):
            if n == 0:
                raise ValueError(
                    f"training data for {value!r} has {end - start} tokens, fewer than one "
                    f"block of train.seq_len + 1 = {seq_len + 1}"
                )
        sizes = np.array([end - start for _, start, end in self.groups], dtype=np.float64)
        self.probs = sizes**alpha / (sizes**alpha).sum()
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.epoch = [0] * len(self.groups)
        self.pos = [0] * len(self.groups)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _perm(self, g: int) -> np.ndarray:
        cached = self._perms.get(g)
        if cached is None or cached[0] != self.epoch[g]:
            rng = np.random.default_rng([self.seed, g, self.epoch[g]])
            self._perms[g] = (self.epoch[g], rng.permutation(self.n_blocks[g]))
        return self._perms[g][1]

    def _next_block(self, g: int) -> int:
        """Token offset of the next block of group ``g``."""
        block = int(self._perm(g)[self.pos[g]])
        self.pos[g] += 1
        if self.pos[g] == self.n_blocks[g]:
            self.epoch[g], self.pos[g] = self.epoch[g] + 1, 0
        return self.groups[g][1] + block * self.seq_len

    def next_batch(self, doc_ids: bool = False) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``targets`` ``[B, T]`` (BOS targets ignored); ``doc_ids`` if asked."""
        if len(self.groups) > 1:
            choice = self.rng.choice(len(self.groups), size=self.batch_size, p=self.probs)
        else:
            choice = np.zeros(self.batch_size, dtype=np.int64)
        starts = np.array([self._next_block(int(g)) for g in choice])
        idx = starts[:, None] + np.arange(self.seq_len + 1)  # [B, T + 1]
        block = torch.from_numpy(self.store.tokens[idx].astype(np.int64))
        targets = block[:, 1:].clone()
        targets[targets == self.store.bos_id] = IGNORE  # nothing predicts a document's start
        batch = {"input_ids": block[:, :-1], "targets": targets}
        if doc_ids:
            doc = np.searchsorted(self.store.offsets, idx[:, :-1], side="right") - 1
            batch["doc_ids"] = torch.from_numpy(doc)
        return batch

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "epoch": list(self.epoch),
            "pos": list(self.pos),
            "seed": self.seed,
            "n_blocks": list(self.n_blocks),
            "fingerprint": self.store.fingerprint,
        }

    def load_state_dict(self, state: dict, restore_rng: bool = True) -> None:
        if len(state["pos"]) != len(self.groups):
            raise ValueError("data position does not match the data: the groups changed")
        if state.get("n_blocks", self.n_blocks) != self.n_blocks:  # older states lack it
            raise ValueError(
                f"the training data changed since the checkpoint ({state['n_blocks']} blocks of "
                f"train.seq_len per group, now {self.n_blocks}): resume needs the same data, "
                "or start a new run.dir"
            )
        if state.get("fingerprint", self.store.fingerprint) != self.store.fingerprint:
            raise ValueError(
                "the training data changed since the checkpoint (its tokens hash to "
                f"{self.store.fingerprint}, the checkpoint's to {state['fingerprint']}): resume "
                "needs the same data, or start a new run.dir"
            )
        self.epoch, self.pos = list(state["epoch"]), list(state["pos"])
        if restore_rng:
            self.rng.bit_generator.state = state["rng"]


def eval_rows(store: TokenStore, seq_len: int, batch_size: int, order=None, pack: bool = True):
    """Batches that score every document once, each in its own attention span.

    A document ``[BOS, x_1..x_n, EOS]`` contributes inputs ``BOS..x_n`` and targets ``x_1..EOS``;
    documents longer than ``T`` are cut into consecutive spans of ``T``. Spans are packed into rows
    with distinct ``doc_ids`` (document masking), padding at the end of a row. ``order`` (default:
    store order) lists the documents to score, in the order to score them. ``pack=False`` gives
    every document its own rows (an expert ensemble then runs an expert on exactly the documents
    that chose it).

    Yields:
        dicts with ``input_ids``, ``targets``, ``doc_ids``, ``doc_index`` (the source document
        of each target, -1 on padding) and ``doc_pos`` (the input's position in its document),
        all ``[B, T]``.
    """
    rows: list[np.ndarray] = []
    row = np.full((5, seq_len), -1, dtype=np.int64)  # input, target, span id, doc index, position
    fill, span = 0, 0
    for d in range(store.n_docs) if order is None else order:
        doc = store.tokens[store.offsets[d] : store.offsets[d + 1]].astype(np.int64)
        for start in range(0, len(doc) - 1, seq_len):
            piece = doc[start : start + seq_len + 1]
            n = len(piece) - 1
            if fill + n > seq_len or (fill and not pack and start == 0):
                rows.append(row)
                row, fill = np.full((5, seq_len), -1, dtype=np.int64), 0
            row[0, fill : fill + n], row[1, fill : fill + n] = piece[:-1], piece[1:]
            row[2, fill : fill + n], row[3, fill : fill + n] = span, d
            row[4, fill : fill + n] = np.arange(start, start + n)
            fill, span = fill + n, span + 1
            if len(rows) == batch_size:
                yield _as_batch(rows)
                rows = []
    if fill:
        rows.append(row)
    if rows:
        yield _as_batch(rows)


def _as_batch(rows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    stacked = torch.from_numpy(np.stack(rows))  # [B, 5, T]
    inputs, targets, spans, docs, positions = stacked.unbind(1)
    return {
        "input_ids": inputs.clamp(min=0),  # padding reads token 0; its targets are ignored
        "targets": targets.masked_fill(docs < 0, IGNORE),
        "doc_ids": spans,
        "doc_index": docs,
        "doc_pos": positions.clamp(min=0),
    }
