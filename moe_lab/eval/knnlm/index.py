"""faiss indexes over datastore keys: exact flat L2 and IVF-PQ, both addressed by stable entry ids.

Every key is added with its entry id (its row when the datastore was built), so removing entries
(opt-out) never renumbers the others and a search result maps back to a datastore row through the
sorted id array. Distances are squared L2, as faiss and kNN-LM (Khandelwal et al. 2020) use them.

Shapes: N = entries, D = key dim, Q = queries, K = neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

__all__ = ["INDEX_KINDS", "IndexSpec", "KnnIndex"]

INDEX_KINDS = ("flat", "ivfpq")
_ADD_CHUNK = 65_536  # keys per add call: bounds the fp32 copy of an fp16 memmap


@dataclass
class IndexSpec:
    """How to build an index; stored in the datastore manifest so a rebuild is the same index."""

    kind: str = "flat"  # flat (exact) | ivfpq (approximate, trained)
    nlist: int | None = None  # IVF cells; None: min(4096, 4 sqrt(N), train keys / 39)
    code_size: int | None = None  # PQ bytes per key (8-bit codes); None: D // 8 (kNN-LM: D // 16)
    nprobe: int = 8  # cells visited per query (SILO: 8; kNN-LM: 32)
    train_size: int = 100_000  # keys sampled to train IVF-PQ (kNN-LM sampled 1M of 103M)
    seed: int = 0  # sampling of the training keys

    def validate(self, n_keys: int, dim: int) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        if self.kind == "flat":
            return
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")
        m = self.pq_size(dim)
        if m < 1 or dim % m:
            raise ValueError(f"code_size ({m}) must divide the key dim ({dim})")
        if n_keys < 256:  # 8-bit PQ fits 256 centroids per sub-quantizer
            raise ValueError(f"IVF-PQ needs at least 256 keys to train, got {n_keys}; use flat")
        if self.nlist is not None and not 1 <= self.nlist <= n_keys:
            raise ValueError(f"nlist must be in [1, {n_keys}] (the keys), got {self.nlist}")

    def pq_size(self, dim: int) -> int:
        return self.code_size if self.code_size is not None else max(dim // 8, 1)

    def cells(self, n_train: int) -> int:
        if self.nlist is not None:
            return self.nlist
        # faiss warns below 39 training points per centroid; kNN-LM used 4096 cells for 1e8 keys
        return max(1, min(4096, int(4 * math.sqrt(n_train)), n_train // 39))


class KnnIndex:
    """A faiss index of datastore keys, searched by squared L2, returning entry ids."""

    def __init__(self, index: faiss.Index, spec: IndexSpec) -> None:
        self.index, self.spec = index, spec

    @classmethod
    def build(
        cls, keys: np.ndarray, ids: np.ndarray, spec: IndexSpec, progress: bool = False
    ) -> KnnIndex:
        """Index ``keys [N, D]`` (fp32 or fp16, may be a memmap) under ``ids [N]`` (int64)."""
        n, dim = keys.shape
        spec.validate(n, dim)
        if spec.kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
        else:
            rng = np.random.default_rng(spec.seed)
            sample = np.sort(rng.choice(n, size=min(n, spec.train_size), replace=False))
            train = np.ascontiguousarray(keys[sample], dtype=np.float32)
            quantizer = faiss.IndexFlatL2(dim)
            index = faiss.IndexIVFPQ(quantizer, dim, spec.cells(len(train)), spec.pq_size(dim), 8)
            index.train(train)
            index.nprobe = spec.nprobe
        bar = tqdm(total=n, desc=f"indexing ({spec.kind})", unit="key", disable=None, leave=False)
        for s in range(0, n, _ADD_CHUNK):
            chunk = np.ascontiguousarray(keys[s : s + _ADD_CHUNK], dtype=np.float32)
            index.add_with_ids(chunk, np.ascontiguousarray(ids[s : s + _ADD_CHUNK], np.int64))
            bar.update(len(chunk))
        bar.close()
        return cls(index, spec)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest keys of each query.

        Args:
            queries: ``[Q, D]`` fp32.
            k: neighbours per query.
            allowed_ids: optional sorted int64 ids; only these entries can be returned. The filter
                acts inside the search (a faiss ID selector), so each query still gets up to ``k``
                permitted neighbours rather than the permitted part of ``k``.

        Returns:
            ``(distances [Q, K] fp32, ids [Q, K] int64)``; ``-1`` ids (distance inf) where fewer
            than ``k`` entries were found.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        cls = faiss.SearchParametersIVF if self.spec.kind == "ivfpq" else faiss.SearchParameters
        params = cls()
        if self.spec.kind == "ivfpq":
            params.nprobe = self.spec.nprobe
        if allowed_ids is not None:
            # The selector reads the array through a pointer: keep it alive until the search ends.
            allowed_ids = np.ascontiguousarray(allowed_ids, dtype=np.int64)
            params.sel = faiss.IDSelectorBatch(allowed_ids)
        dist, ids = self.index.search(queries, k, params=params)
        dist[ids < 0] = np.inf  # faiss pads with -1 ids and a huge float
        return dist, ids

    def remove(self, ids: np.ndarray) -> int:
        """Remove entries by id; returns how many were removed."""
        return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        tmp.rename(path)

    @classmethod
    def load(cls, path: Path, spec: IndexSpec) -> KnnIndex:
        return cls(faiss.read_index(str(path)), spec)
