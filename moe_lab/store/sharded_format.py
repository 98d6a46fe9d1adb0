"""Sharded (FSDP2) checkpoints without pickles: DCP's planning, stored as safetensors and JSON.

DCP decides which rank writes which chunk of which tensor (replicated entries once, DTensor
shards, expert-parallel rows as row shards); this storage layer writes each rank's chunks into
``rank<i>.safetensors`` and one ``index.json``: every entry's shape, dtype and chunks, the file
and key of each chunk, and the non-tensor values (the optimizer's hyperparameters) themselves.
Nothing in the directory is a pickle, so loading it runs no code from it. Checkpoints in DCP's
own format (``.metadata`` and ``.distcp`` files) are still read, through the restricted
unpickler of :mod:`moe_lab.store.sharded`.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from moe_lab.store.sharded import UnsafeCheckpointError, safe_load

__all__ = ["INDEX", "load_sharded", "save_sharded"]

INDEX = "index.json"
FORMAT = "moe_lab-sharded-1"


def _to_json(value: Any) -> Any:
    """Plain values as JSON, tuples marked so they come back as tuples; nothing else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _to_json(v) for k, v in value.items()}}
    raise TypeError(f"a {type(value).__name__} cannot be stored without pickling it")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"tuple"}:
            return tuple(_from_json(v) for v in value["tuple"])
        if set(value) == {"dict"}:
            return {k: _from_json(v) for k, v in value["dict"].items()}
        raise UnsafeCheckpointError(f"unexpected value in {INDEX}: {value!r:.80}")
    return value


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class SafetensorsWriter(StorageWriter):
    """Each rank's chunks into ``rank<i>.safetensors``; the index into ``index.json``."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan):
        self.path.mkdir(parents=True, exist_ok=True)
        return plan

    def prepare_global_plan(self, plans):
        return [replace(plan, storage_data=f"rank{i}.safetensors") for i, plan in enumerate(plans)]

    def write_data(self, plan, planner) -> Future:
        tensors, results = {}, []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                value = _to_json(planner.lookup_object(item.index))
                results.append(WriteResult(item.index, 0, {"value": value}))
                continue
            key = f"{item.index.fqn}@{','.join(map(str, item.index.offset or ()))}"
            tensor = planner.resolve_data(item).detach().to("cpu").contiguous().clone()
            tensors[key] = tensor
            nbytes = tensor.numel() * tensor.element_size()
            results.append(WriteResult(item.index, nbytes, {"file": plan.storage_data, "key": key}))
        save_file(tensors, self.path / plan.storage_data)
        return _done(results)

    def finish(self, metadata: Metadata, results) -> None:
        entries = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata):
                entries[fqn] = {"value": True}
                continue
            chunks = [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in md.chunks]
            dtype = str(md.properties.dtype).removeprefix("torch.")
            entries[fqn] = {"dtype": dtype, "size": list(md.size), "chunks": chunks}
        storage = [
            {"fqn": r.index.fqn, "offset": None if r.index.offset is None else list(r.index.offset)}
            | r.storage_data
            for rank in results
            for r in rank
        ]
        index = {"format": FORMAT, "entries": entries, "storage": storage,
                 "planner_data": _to_json(metadata.planner_data)}  # fmt: skip
        tmp = self.path / f"{INDEX}.tmp"
        tmp.write_text(json.dumps(index))
        tmp.rename(self.path / INDEX)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path))


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UnsafeCheckpointError(f"{INDEX} names {name!r}, which is not a torch dtype")
    return dtype


class SafetensorsReader(StorageReader):
    """Reads what :class:`SafetensorsWriter` wrote; only files of the checkpoint's directory."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self.storage: dict[MetadataIndex, dict] = {}
        self.refused: UnsafeCheckpointError | None = None

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        try:
            return self._read_index()
        except UnsafeCheckpointError as e:
            self.refused = e  # DCP buries it in a CheckpointException: load_sharded digs it out
            raise

    def _read_index(self) -> Metadata:
        index = json.loads((self.path / INDEX).read_text())
        if index.get("format") != FORMAT:
            raise UnsafeCheckpointError(f"{self.path / INDEX} is not a {FORMAT} index")
        entries = {}
        for fqn, e in index["entries"].items():
            if "value" in e:
                entries[fqn] = BytesStorageMetadata()
                continue
            chunks = [ChunkStorageMetadata(torch.Size(c["offsets"]), torch.Size(c["sizes"]))
                      for c in e["chunks"]]  # fmt: skip
            props = TensorProperties(dtype=_dtype(e["dtype"]))
            entries[fqn] = TensorStorageMetadata(props, torch.Size(e["size"]), chunks)
        storage = {}
        for s in index["storage"]:
            if "file" in s and (Path(s["file"]).name != s["file"] or "/" in s["file"]):
                raise UnsafeCheckpointError(f"{INDEX} points outside its directory: {s['file']}")
            storage[MetadataIndex(s["fqn"], s["offset"])] = s
        return Metadata(entries, _from_json(index["planner_data"]), storage, StorageMeta())

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *a, **k) -> None:
        self.storage = metadata.storage_data

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner) -> Future:
        files = {}
        for item in plan.items:
            entry = self.storage[item.storage_index]
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(json.dumps(entry["value"]).encode()))
                continue
            if entry["file"] not in files:
                files[entry["file"]] = safe_open(self.path / entry["file"], "pt")
            stored = files[entry["file"]].get_tensor(entry["key"])
            offsets = zip(item.storage_offsets, item.lengths, strict=True)
            for dim, (start, length) in enumerate(offsets):
                stored = stored.narrow(dim, start, length)
            target = planner.resolve_tensor(item).detach()
            if target.shape != stored.shape:
                raise ValueError(f"{entry['key']}: stored {tuple(stored.shape)}, "
                                 f"expected {tuple(target.shape)}")  # fmt: skip
            target.copy_(stored)
            planner.commit_tensor(item, target)
        return _done(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return (Path(checkpoint_id) / INDEX).is_file()


class _JsonPlanner(DefaultLoadPlanner):
    """The non-tensor values come as JSON (see :func:`_to_json`), not as pickles."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = _from_json(json.load(value))
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def save_sharded(state: dict, path: str | os.PathLike) -> None:
    """``dcp.save(state)`` into ``path`` as safetensors and JSON (a collective on every rank)."""
    dcp.save(state, storage_writer=SafetensorsWriter(path))


def load_sharded(state: dict, path: str | os.PathLike, **kwargs) -> None:
    """``dcp.load(state)`` from ``path``: this format, or DCP's own through the restricted
    reader of :mod:`moe_lab.store.sharded`."""
    if not (Path(path) / INDEX).is_file():
        safe_load(state, path, **kwargs)
        return
    reader = SafetensorsReader(path)
    try:
        dcp.load(state, storage_reader=reader, planner=_JsonPlanner(), **kwargs)
    except (Exception, CheckpointException):
        if reader.refused is not None:
            raise UnsafeCheckpointError(f"{path}: {reader.refused}") from None
        raise
