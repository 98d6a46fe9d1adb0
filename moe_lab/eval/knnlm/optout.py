"""Opt-out: remove documents' entries from a datastore and from every index, on disk.

SILO (Min et al. 2023) argues that a datastore lets data owners opt out, but ships no code for it.
Here removal is physical: the arrays are rewritten without the entries (their keys are gone from
disk, not masked), the flat index drops them with faiss ``remove_ids``, and an IVF-PQ index is
retrained from the remaining keys, since its centroids and PQ codebooks were fitted on keys that
may include the removed ones. Entry ids are stable, so nothing else is renumbered. After opt-out
the datastore's predictions equal those of a datastore built without the documents
(``tests/test_knnlm_optout.py``).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from moe_lab import checksums
from moe_lab.eval.knnlm.datastore import ARRAYS, Datastore
from moe_lab.eval.knnlm.index import IndexSpec, KnnIndex
from moe_lab.store.checkpoint import write_json

__all__ = ["opt_out"]

log = logging.getLogger(__name__)
_COPY_CHUNK = 262_144  # rows copied at a time: bounds memory on large datastores


def opt_out(
    datastore: Datastore | str | Path,
    docs: Iterable[int] | None = None,
    where: dict[str, list[str]] | None = None,
    progress: bool = False,
) -> tuple[Datastore, int]:
    """Remove the entries of documents ``docs`` and of documents whose group values match.

    Args:
        datastore: an open datastore or its directory; the directory is rewritten.
        docs: document indices (into the training TokenStore the datastore was built from).
        where: ``{field: [values]}``, e.g. ``{"domain": ["legal"]}``.

    Returns:
        ``(the reopened datastore, number of entries removed)``.

    Raises:
        ValueError: nothing was asked for, or nothing matches (e.g. already opted out).
    """
    ds = datastore if isinstance(datastore, Datastore) else Datastore(datastore)
    if docs is None and not where:
        raise ValueError("opt_out needs documents (docs) or group values (where)")
    remove = ds.select(docs, where)
    n_removed = int(remove.sum())
    if n_removed == 0:
        raise ValueError(f"no entries match docs={docs} where={where} (already opted out?)")
    keep = ~remove
    path = ds.path
    tmp = path.with_name(f".{path.name}-optout")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _copy_kept(ds, keep, tmp)
        shutil.copy2(path / "group_codes.npy", tmp / "group_codes.npy")
        manifest = dict(ds.manifest)
        manifest["n_entries"] = int(keep.sum())
        before, asked = manifest["opted_out"], [] if docs is None else [int(d) for d in docs]
        manifest["opted_out"] = {  # what was asked, for audit; the removed keys are gone
            "docs": sorted({*before["docs"], *asked}),
            "where": [*before["where"], *[[f, list(v)] for f, v in (where or {}).items()]],
        }
        manifest["indexes"] = dict(manifest["indexes"])
        removed_ids = np.asarray(ds.ids[remove])
        new_keys = np.load(tmp / "keys.npy", mmap_mode="r")
        new_ids = np.load(tmp / "ids.npy", mmap_mode="r")
        for kind, raw in ds.manifest["indexes"].items():
            spec = IndexSpec(**raw)
            if kind == "flat":
                index = KnnIndex.load(path / f"index-{kind}.faiss", spec)  # a copy, not ds's
                assert index.remove(removed_ids) == n_removed
            elif len(new_ids) < 256:  # too few keys left to train on: drop it, never fail
                log.warning("dropped the %s index: %d entries are left", kind, len(new_ids))
                del manifest["indexes"][kind]
                continue
            else:  # trained on keys: refit without the removed ones
                index = KnnIndex.build(new_keys, new_ids, spec, progress)
            index.save(tmp / f"index-{kind}.faiss")
        write_json(tmp / "manifest.json", manifest)
        checksums.record(tmp)
        del new_keys, new_ids
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap directories: the old one (with the removed keys) is deleted, not kept as a backup.
    # A crash between the two renames leaves the previous datastore at .NAME-old.
    old = path.with_name(f".{path.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old)
    log.info("opted out %d entries from %s", n_removed, path)
    return Datastore(path), n_removed


def _copy_kept(ds: Datastore, keep: np.ndarray, out: Path) -> None:
    """Write every array of ``ds`` without the removed rows, as ``.npy`` files in ``out``."""
    n = int(keep.sum())
    for name in ARRAYS:
        src = getattr(ds, name)
        dst = np.lib.format.open_memmap(
            out / f"{name}.npy", mode="w+", dtype=src.dtype, shape=(n, *src.shape[1:])
        )
        fill = 0
        for s in range(0, len(src), _COPY_CHUNK):
            part = np.asarray(src[s : s + _COPY_CHUNK])[keep[s : s + _COPY_CHUNK]]
            dst[fill : fill + len(part)] = part
            fill += len(part)
        dst.flush()
        del dst
