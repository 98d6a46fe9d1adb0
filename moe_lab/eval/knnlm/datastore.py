"""The kNN-LM datastore: one (key, next token) entry per training position, with its provenance.

Keys are a hidden state of a moe_lab :class:`~moe_lab.nn.model.Transformer` at each position of the
training documents, computed exactly as evaluation computes them
(:func:`moe_lab.data.packing.eval_rows`: document masking, positions restarting per document), so an
entry never sees another document. ``key_type``:

- ``ffn_input``: the input to the final layer's FFN after its norm, Khandelwal et al.'s best key
  (kNN-LM's ``--knn-keytype last_ffn_input``);
- ``final``: the final normalised hidden state, the one the output head reads.

A datastore is a directory: ``keys.npy [N, D]`` (fp32 or fp16), ``vals.npy [N]`` (the next token),
``ids.npy [N]`` (stable entry ids, sorted), ``docs.npy [N]`` and ``positions.npy [N]`` (the source
document and the input's position in it), ``group_codes.npy [n_docs, G]`` (each document's group
values, e.g. ``domain``, ``security_domain``), one ``index-<kind>.faiss`` per index, and
``manifest.json``, which records the model and tokenizer fingerprints, the key type and the indexes.
The ``.npy`` files open as memory maps.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_lab import checksums
from moe_lab.data.packing import IGNORE, TokenStore, eval_rows
from moe_lab.data.policy import AccessPolicy
from moe_lab.data.tokenizer import Tokenizer
from moe_lab.eval.knnlm.index import IndexSpec, KnnIndex
from moe_lab.nn.model import Transformer
from moe_lab.store.checkpoint import read_json, write_json

__all__ = ["ARRAYS", "KEY_TYPES", "Datastore", "build_datastore", "model_fingerprint", "model_keys"]

KEY_TYPES = ("ffn_input", "final")
ARRAYS = ("keys", "vals", "ids", "docs", "positions")  # one memory-mapped file each, entry-aligned


def model_fingerprint(model: Transformer) -> str:
    """A hash of the weights (names, dtypes, shapes, bytes): keys from other weights differ."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def model_keys(
    model: Transformer, input_ids: torch.Tensor, doc_ids: torch.Tensor | None, key_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Datastore keys and final hidden states of a batch.

    Args:
        input_ids, doc_ids: ``[B, T]``, as for :meth:`Transformer.hidden_states`.
        key_type: one of :data:`KEY_TYPES`.

    Returns:
        ``(keys [B, T, D], final hidden states [B, T, D])``.
    """
    if key_type not in KEY_TYPES:
        raise ValueError(f"key_type must be one of {KEY_TYPES}, got {key_type!r}")
    captured = []
    hook = None
    if key_type == "ffn_input":  # a hook, so the model's forward stays the one training uses
        norm = model.layers[-1].ffn_norm
        hook = norm.register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        h, _, _ = model.hidden_states(input_ids, doc_ids)
    finally:
        if hook is not None:
            hook.remove()
    return (captured[0] if captured else h), h


class Datastore:
    """A datastore directory opened for reading: arrays as memory maps, plus the manifest."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a kNN-LM datastore (no manifest.json)")
        checksums.verify(self.path)  # every file: a flipped bit in a key would go unnoticed
        self.manifest = read_json(self.path / "manifest.json")
        for name in ARRAYS:
            setattr(self, name, np.load(self.path / f"{name}.npy", mmap_mode="r"))
        self.group_codes = np.load(self.path / "group_codes.npy")
        self._indexes: dict[str, KnnIndex] = {}

    keys: np.ndarray  # [N, D] fp32 or fp16
    vals: np.ndarray  # [N] int32 next token
    ids: np.ndarray  # [N] int64 stable entry ids, increasing
    docs: np.ndarray  # [N] int64 source document (index in the training TokenStore)
    positions: np.ndarray  # [N] int32 position of the key's input token in its document

    @property
    def n_entries(self) -> int:
        return len(self.vals)

    @property
    def key_type(self) -> str:
        return self.manifest["key_type"]

    @property
    def group_fields(self) -> list[str]:
        return self.manifest["group_fields"]

    def check(self, model: Transformer, tokenizer: Tokenizer | None = None) -> None:
        """Refuse a model (or tokenizer) other than the one the keys came from."""
        if model_fingerprint(model) != self.manifest["model"]:
            raise ValueError(
                f"datastore {self.path} was built with another model (weights fingerprint "
                f"{self.manifest['model']}); rebuild it for this model"
            )
        built = self.manifest.get("tokenizer")
        if tokenizer is not None and built is not None and tokenizer.fingerprint() != built:
            raise ValueError(f"datastore {self.path} was built with another tokenizer")

    def entry_groups(self, field: str) -> np.ndarray:
        """``[N]`` value of group ``field`` for every entry (its document's value), as strings."""
        if field not in self.group_fields:
            raise ValueError(f"datastore has no group field {field!r}; it has {self.group_fields}")
        g = self.group_fields.index(field)
        values = np.array(self.manifest["group_values"][g], dtype=object)
        return values[self.group_codes[self.docs, g]]

    def provenance(self, field: str) -> list[str]:
        """The values of ``field`` among the live entries: the domains whose data the datastore
        holds, for :meth:`moe_lab.data.policy.AccessPolicy.check` to refuse the datastore as a
        whole."""
        return sorted(set(np.unique(self.entry_groups(field)).tolist()))

    def select(
        self, docs: Iterable[int] | None = None, where: dict[str, list[str]] | None = None
    ) -> np.ndarray:
        """``[N]`` bool: entries of the listed documents, or whose group values are listed."""
        mask = np.zeros(self.n_entries, dtype=bool)
        if docs is not None:
            docs = np.asarray(list(docs), dtype=np.int64)
            if len(docs) and (docs.min() < 0 or docs.max() >= self.manifest["n_docs"]):
                raise ValueError(f"document index out of range [0, {self.manifest['n_docs']})")
            mask |= np.isin(self.docs, docs)
        for field, values in (where or {}).items():
            mask |= np.isin(self.entry_groups(field), list(values))
        return mask

    def permitted(
        self,
        policy: AccessPolicy,
        principal: str,
        field: str = "security_domain",
        public: str = "public",
    ) -> np.ndarray:
        """``[N]`` bool: the entries ``principal`` may retrieve, by their documents' ``field``.

        Pass it as ``allowed`` to :meth:`search`. Fails closed like the policy: an unknown
        principal, or a grant of a domain the datastore's documents never had, raises.
        """
        values = self.entry_groups(field)  # raises for a field the datastore lacks
        known = self.manifest["group_values"][self.group_fields.index(field)]
        domains = [v for v in known if v != public]
        return np.isin(values, policy.permitted(principal, public, domains))

    def index(self, kind: str) -> KnnIndex:
        """The saved index of ``kind`` (see :meth:`add_index`)."""
        if kind not in self._indexes:
            if kind not in self.manifest["indexes"]:
                raise ValueError(
                    f"datastore {self.path} has no {kind!r} index; it has "
                    f"{sorted(self.manifest['indexes'])} (add one with add_index)"
                )
            spec = IndexSpec(**self.manifest["indexes"][kind])
            self._indexes[kind] = KnnIndex.load(self.path / f"index-{kind}.faiss", spec)
        return self._indexes[kind]

    def add_index(self, spec: IndexSpec, progress: bool = False) -> KnnIndex:
        """Build, save and register an index of every entry (replacing one of the same kind)."""
        if self.n_entries == 0:
            raise ValueError(f"datastore {self.path} is empty: nothing to index")
        index = KnnIndex.build(self.keys, self.ids, spec, progress)
        index.save(self.path / f"index-{spec.kind}.faiss")
        self.manifest["indexes"][spec.kind] = asdict(spec)
        write_json(self.path / "manifest.json", self.manifest)
        checksums.add(self.path / f"index-{spec.kind}.faiss")
        checksums.add(self.path / "manifest.json")
        self._indexes[spec.kind] = index
        return index

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Datastore rows of entry ``ids`` (any shape); -1 stays -1."""
        rows = np.minimum(np.searchsorted(self.ids, np.maximum(ids, 0)), max(self.n_entries - 1, 0))
        found = ids >= 0
        if found.any() and not np.array_equal(np.asarray(self.ids)[rows[found]], ids[found]):
            raise RuntimeError(f"{self.path}: an index returned entries the arrays no longer hold")
        return np.where(found, rows, -1)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        index: str = "flat",
        recompute: bool = True,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest entries of each query, nearest first.

        Args:
            queries: ``[Q, D]`` keys of the same ``key_type``.
            k: neighbours per query, at most the number of (allowed) entries.
            index: which saved index to search.
            recompute: replace the index's distances by exact squared L2 to the stored keys and
                re-sort (kNN-LM's default; IVF-PQ distances are approximate, urvashik/knnlm#4).
            allowed: optional ``[N]`` bool over entries; only these can be returned.

        Returns:
            ``(distances [Q, K] fp32, rows [Q, K] int64)``: squared L2 and datastore rows, with
            ``inf`` / ``-1`` where the index found fewer than ``k``.
        """
        available = self.n_entries if allowed is None else int(np.count_nonzero(allowed))
        if not 1 <= k <= available:
            what = "entries" if allowed is None else "permitted entries"
            raise ValueError(f"k must be in [1, {available}] ({what} in the datastore), got {k}")
        allowed_ids = None if allowed is None else self.ids[np.asarray(allowed, dtype=bool)]
        dist, ids = self.index(index).search(queries, k, allowed_ids)
        rows = self.rows(ids)
        if recompute:
            found = rows >= 0
            stored = np.asarray(self.keys[rows[found]], dtype=np.float32)  # [F, D]
            q = np.repeat(np.asarray(queries, dtype=np.float32), k, axis=0)[found.ravel()]
            dist = np.full(rows.shape, np.inf, dtype=np.float32)
            dist[found] = ((stored - q) ** 2).sum(-1)
            order = np.argsort(dist, axis=1, kind="stable")
            dist, rows = np.take_along_axis(dist, order, 1), np.take_along_axis(rows, order, 1)
        return dist, rows


def build_datastore(
    model: Transformer,
    store: TokenStore,
    path: str | Path,
    *,
    seq_len: int,
    batch_size: int = 8,
    key_type: str = "ffn_input",
    dtype: str = "float32",
    tokenizer: Tokenizer | None = None,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
) -> Datastore:
    """Compute the keys of every training position of ``store`` and write a datastore directory.

    Args:
        model: the LM whose hidden states are the keys; its fingerprint is recorded.
        store: the training documents; entry provenance is a document index into it.
        path: the datastore directory (written atomically: a temporary directory renamed).
        seq_len: context of each key; longer documents are cut into spans as in evaluation.
        key_type: ``ffn_input`` or ``final`` (see the module docstring).
        dtype: ``float32`` or ``float16`` keys on disk.
        tokenizer: optional; its fingerprint is recorded and checked at query time.
        overwrite: replace an existing datastore at ``path``.
    """
    path = Path(path)
    if key_type not in KEY_TYPES:
        raise ValueError(f"key_type must be one of {KEY_TYPES}, got {key_type!r}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    n = int(store.offsets[-1]) - store.n_docs  # every token but each document's BOS is a target
    if store.n_docs == 0 or n <= 0:
        raise ValueError("the token store is empty: a datastore needs at least one document")
    moe = model.cfg.moe
    if moe is not None and moe.capacity_factor is not None:
        # Token dropping depends on every token of the batch, so a key would depend on the other
        # documents packed with it, and opting one out would change (leak into) the others.
        raise ValueError(
            "model.moe.capacity_factor is set: dropped tokens couple the documents of a batch; "
            "build the datastore with the dropless layer (model.moe.capacity_factor=null)"
        )
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-building-"))
    try:
        _write_entries(model, store, tmp, n, seq_len, batch_size, key_type, dtype, device)
        np.save(tmp / "group_codes.npy", store.group_codes)
        manifest = {
            "format": 1,
            "key_type": key_type,
            "dim": model.cfg.dim,
            "dtype": dtype,
            "seq_len": seq_len,
            "model": model_fingerprint(model),
            "tokenizer": tokenizer.fingerprint() if tokenizer is not None else None,
            "n_docs": store.n_docs,
            "n_built": n,
            "n_entries": n,
            "group_fields": list(store.group_fields),
            "group_values": [list(v) for v in store.group_values],
            "opted_out": {"docs": [], "where": []},
            "indexes": {},
        }
        write_json(tmp / "manifest.json", manifest)
        checksums.record(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Datastore(path)


@torch.no_grad()
def _write_entries(model, store, out, n, seq_len, batch_size, key_type, dtype, device) -> None:
    was_training = model.training
    model.eval()
    open_npy = np.lib.format.open_memmap
    keys = open_npy(out / "keys.npy", mode="w+", dtype=dtype, shape=(n, model.cfg.dim))
    vals = open_npy(out / "vals.npy", mode="w+", dtype=np.int32, shape=(n,))
    docs = open_npy(out / "docs.npy", mode="w+", dtype=np.int64, shape=(n,))
    positions = open_npy(out / "positions.npy", mode="w+", dtype=np.int32, shape=(n,))
    np.save(out / "ids.npy", np.arange(n, dtype=np.int64))
    fill = 0
    bar = tqdm(total=n, desc="datastore keys", unit="tok", disable=None, leave=False)
    for batch in eval_rows(store, seq_len, batch_size):
        ids, doc_ids = batch["input_ids"].to(device), batch["doc_ids"].to(device)
        k, _ = model_keys(model, ids, doc_ids, key_type)
        scored = (batch["targets"] != IGNORE).flatten()
        m = int(scored.sum())
        keys[fill : fill + m] = k.flatten(0, 1)[scored.to(k.device)].float().cpu().numpy()
        vals[fill : fill + m] = batch["targets"].flatten()[scored].numpy()
        docs[fill : fill + m] = batch["doc_index"].flatten()[scored].numpy()
        positions[fill : fill + m] = batch["doc_pos"].flatten()[scored].numpy()
        fill += m
        bar.update(m)
    bar.close()
    model.train(was_training)
    assert fill == n, (fill, n)  # eval_rows scores every target of every document once
    for arr in (keys, vals, docs, positions):
        arr.flush()
