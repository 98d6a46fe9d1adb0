"""Checksums of the artefacts the library writes (checkpoints, tokenizers, clusterers, kNN
datastores), recorded when a directory is written and verified when its files are read: a flipped
bit or a truncated file is an error naming the file, not a model that quietly evaluates to NaN.

A directory's ``checksums.json`` maps each file (relative path) to its SHA-256. Directories
written before checksums were recorded have none and are read unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["MANIFEST", "ChecksumError", "add", "forget", "record", "verify"]

MANIFEST = "checksums.json"
_SKIP = {MANIFEST, "COMPLETE", ".lock"}  # the marker is written after the manifest


class ChecksumError(ValueError):
    """A file differs from what was written."""


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write(directory: Path, sums: dict[str, str]) -> None:
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(sums, indent=1, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)


def _read(directory: Path) -> dict[str, str] | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ChecksumError(f"{path} is damaged ({e})") from None


def record(directory: str | Path) -> None:
    """Write the checksums of every file under ``directory`` (recursively)."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in _SKIP)
    _write(directory, {p.relative_to(directory).as_posix(): _digest(p) for p in files})


def add(path: str | Path) -> None:
    """Record (or update) the checksum of the one file ``path`` in its directory's checksums."""
    path = Path(path)
    sums = _read(path.parent) or {}
    _write(path.parent, {**sums, path.name: _digest(path)})


def verify(directory: str | Path, names: Iterable[str] | None = None) -> None:
    """Check the files ``names`` (relative paths; None: every recorded file) against
    ``directory``'s checksums; nothing to check where none were recorded.

    Raises:
        ChecksumError: a file differs from its checksum.
        FileNotFoundError: a recorded file is missing.
    """
    directory = Path(directory)
    sums = _read(directory)
    if sums is None:
        return
    for name in sums if names is None else names:
        if name not in sums:
            continue
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (it was written with {directory})")
        if _digest(path) != sums[name]:
            raise ChecksumError(
                f"{path} is damaged: its contents differ from what was written (checksum "
                f"mismatch); restore it or use another checkpoint"
            )


def forget(directory: str | Path, names: Iterable[str]) -> None:
    """Drop ``names`` from ``directory``'s checksums (files deliberately deleted)."""
    directory = Path(directory)
    sums = _read(directory)
    if sums is not None:
        _write(directory, {k: v for k, v in sums.items() if k not in set(names)})
