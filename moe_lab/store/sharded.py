"""Reading sharded (FSDP2, DCP) checkpoints without running code from them.

DCP stores tensors in ``.distcp`` files, which torch reads with ``torch.load(weights_only=True)``,
and its index in ``.metadata``, which it reads with a bare ``pickle.load``: a crafted
``.metadata`` would run its payload in any command that loads the checkpoint. :class:`SafeReader`
reads that index with an unpickler that builds only the classes a DCP index is made of (DCP's
metadata dataclasses, ``torch.Size``, dtypes and layouts, paths) and refuses every other global,
as ``torch.load(weights_only=True)`` does for tensors. DCP's non-tensor entries are pickles too,
which it reads unrestricted: :class:`SafePlanner` reads them with ``weights_only=True``.
"""

from __future__ import annotations

import io
import pickle

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

__all__ = ["SafePlanner", "SafeReader", "UnsafeCheckpointError", "load_metadata", "safe_load"]

# Every global a DCP index holds (found by recording them over this library's checkpoints).
_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_METADATA, "Metadata"),
    (_METADATA, "MetadataIndex"),
    (_METADATA, "TensorStorageMetadata"),
    (_METADATA, "BytesStorageMetadata"),
    (_METADATA, "ChunkStorageMetadata"),
    (_METADATA, "TensorProperties"),
    (_METADATA, "StorageMeta"),
    (_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint index names something other than checkpoint metadata."""


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _ALLOWED or is_dtype:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"the checkpoint index refers to {module}.{name}, which is not checkpoint metadata: "
            "refused (it could run code)"
        )


def load_metadata(stream) -> Metadata:
    """A DCP index from ``stream``, built from allowed classes only."""
    metadata = _IndexUnpickler(stream).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"the checkpoint index is a {type(metadata).__name__}")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader, its index read by :func:`load_metadata`."""

    refused: UnsafeCheckpointError | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        # DCP retries a failed index with a rank-local one: the refusal must be the last word.
        if self.refused is not None:
            raise self.refused
        path = self.fs.concat_path(self.path, ".metadata")
        if kwargs.get("rank") is not None and hasattr(self, "_get_metadata_path"):
            path = self._get_metadata_path(kwargs["rank"])
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = load_metadata(stream)
            except UnsafeCheckpointError as e:
                self.refused = e
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, its non-tensor items read with ``torch.load(weights_only=True)``.

    DCP stores non-tensor values (the optimizer's hyperparameters) as pickles and reads them with
    ``weights_only=False``; the index decides which entries are such values, so a crafted index
    could mark a weight as one and point it at a payload."""

    refused: UnsafeCheckpointError | None = None

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            self.refused = UnsafeCheckpointError(
                f"the checkpoint entry {read_item.dest_index.fqn} is a pickle of something other "
                f"than plain values: refused (it could run code): {str(e).splitlines()[0]}"
            )
            raise self.refused from None
        # DCP's own bookkeeping places the value: handed the checked value, re-serialised, its
        # unrestricted torch.load can only rebuild plain values.
        checked = io.BytesIO()
        torch.save(loaded, checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def safe_load(state: dict, path, **kwargs) -> None:
    """``dcp.load(state)`` from ``path`` through :class:`SafeReader` and :class:`SafePlanner`.
    A refused index or entry is raised as :class:`UnsafeCheckpointError`: DCP would bury it in a
    ``CheckpointException``, which is a ``BaseException``, as is every error ``dcp.load`` raises."""
    reader, planner = SafeReader(path), SafePlanner()
    try:
        dcp.load(state, storage_reader=reader, planner=planner, **kwargs)
    except (Exception, CheckpointException):
        refused = reader.refused or planner.refused
        if refused is not None:
            raise UnsafeCheckpointError(f"{path}: {refused}") from None
        raise
