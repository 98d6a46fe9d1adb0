"""Documents: load local jsonl / parquet / text (or hub datasets) through ``datasets``, validate
them, select and split them, and pick the tokenizer.

Documents stay in ``datasets``' memory-mapped Arrow tables; :mod:`moe_lab.data.packing` tokenizes
them into memory-mapped token arrays. Every problem with the input is a :class:`DataError` naming
the file, the record and the field, raised before anything is written into a run directory.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from pathlib import Path

import datasets

from moe_lab.config import Config, DataConfig
from moe_lab.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "CORPUS_DIR",
    "DataError",
    "build_tokenizer",
    "load_documents",
    "load_splits",
    "narrowed",
]

log = logging.getLogger(__name__)

CORPUS_DIR = Path(__file__).parent / "corpus"
CORPUS_GROUPS = ["domain", "lang"]
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".md": "text"}


class DataError(ValueError):
    """The input data is missing, empty, malformed, or lacks a configured field."""


def _format_of(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    return _FORMATS.get(suffixes[-1]) if suffixes else None


def _check_lines(path: Path) -> None:
    """Fail with the line number of the first invalid UTF-8 byte sequence in a text-like file,
    or of the first line of a ``.jsonl`` file that is not a JSON record; a damaged or cut-short
    ``.gz`` is named too (datasets would report a bare zlib or EOF error)."""
    opener = gzip.open if path.suffix == ".gz" else open
    if path.suffix in (".bz2", ".xz", ".zst"):
        return  # left to the loader, which names the file
    json_lines = ".jsonl" in path.suffixes
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}, line {line_no}: invalid UTF-8 ({e.reason})") from None
                if json_lines and text.strip():
                    try:
                        json.loads(text)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {line_no}: not valid JSON ({e})") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(
            f"{path}: the compressed file is damaged or cut short after line {line_no} ({e})"
        ) from None


def _load_one(source: str, text_field: str) -> datasets.Dataset:
    """One file (or hub dataset) as a Dataset, with readable errors."""
    path = Path(source)
    fmt = _format_of(path)
    if fmt is None and not path.exists() and "/" in source and not source.startswith((".", "/")):
        try:  # a hub dataset name such as "org/name"; tests use local files only
            return datasets.load_dataset(source, split="train")
        except Exception as e:  # noqa: BLE001 - any failure means the name did not resolve
            raise DataError(f"could not load hub dataset {source!r}: {e}") from None
    if not path.is_file():
        raise DataError(f"data file {source} does not exist")
    if fmt is None:
        raise DataError(f"{source}: unknown file type; expected one of {sorted(_FORMATS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{source}: no records (empty file)")
    if fmt != "parquet":
        _check_lines(path)
    kwargs = {"sample_by": "document"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for malformed input
        reason = str(e).strip() or type(e).__name__
        raise DataError(f"{source}: could not be read as {fmt}: {reason}") from None
    if fmt == "text" and text_field != "text":
        ds = ds.rename_column("text", text_field)
    return ds


def _check_field(ds: datasets.Dataset, source: str, name: str, key: str) -> None:
    """Every record has a string value for ``name``; otherwise name the first offending record."""
    if name not in ds.column_names:
        raise DataError(
            f"{source}: records have no field {name!r} ({key}); fields are {ds.column_names}"
        )
    for start in range(0, len(ds), 10_000):
        values = ds[start : start + 10_000][name]
        for i, value in enumerate(values):
            if not isinstance(value, str):
                what = "has no" if value is None else f"has a non-string ({type(value).__name__})"
                raise DataError(f"{source}: record {start + i + 1} {what} field {name!r} ({key})")


def load_documents(
    files: list[str],
    text_field: str = "text",
    group_fields: list[str] = (),
    include: dict[str, list[str]] | None = None,
) -> datasets.Dataset:
    """Load and validate documents from several files into one Dataset.

    Args:
        files: jsonl (optionally .gz), parquet or text files; a text file is one document.
        text_field: the field holding the document text.
        group_fields: fields every record must carry (evaluation reports per value of each).
        include: keep only records whose field has one of the listed values.

    Returns:
        A Dataset with exactly the columns ``[text_field, *group_fields]``.

    Raises:
        DataError: naming the file, record and field of the first problem found.
    """
    if not files:
        raise DataError("no data files given (data.train_files)")
    include = dict(include or {})
    for name in include:
        if name not in group_fields:
            raise DataError(f"data.include filters on {name!r}, which is not in data.group_fields")
    parts = []
    columns = [text_field, *group_fields]
    for source in files:
        ds = _load_one(source, text_field)
        if len(ds) == 0:
            raise DataError(f"{source}: no records")
        _check_field(ds, source, text_field, "data.text_field")
        for name in group_fields:
            _check_field(ds, source, name, "data.group_fields")
        parts.append(ds.select_columns(columns))
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if include:
        wanted = {k: set(map(str, v)) for k, v in include.items()}
        ds = ds.filter(lambda r: all(r[k] in v for k, v in wanted.items()))
        if len(ds) == 0:
            raise DataError(f"no documents left after data.include {include}")
    return ds


def _corpus_files(split: str) -> list[str]:
    path = CORPUS_DIR / f"{split}.jsonl.gz"
    if not path.is_file():
        raise DataError(f"the shipped corpus is missing {path}; reinstall moe_lab")
    return [str(path)]


def load_splits(
    cfg: Config, need_train: bool = True
) -> tuple[datasets.Dataset | None, datasets.Dataset, list[str]]:
    """The training and validation documents of a run, and the group fields in force.

    With no ``data.train_files`` the corpus shipped with moe_lab is used, with its own validation
    split and the group fields ``domain`` and ``lang``. Otherwise validation comes from
    ``data.valid_files`` or, failing that, a seeded ``data.valid_fraction`` of whole documents.
    Without ``need_train`` the training documents are loaded only when validation is cut from
    them (else None is returned in their place).
    """
    data: DataConfig = cfg.data
    datasets.disable_progress_bars()
    shipped = not data.train_files
    groups = list(data.group_fields) if data.group_fields is not None else []
    if shipped and data.group_fields is None:
        groups = list(CORPUS_GROUPS)
    if data.sample_by is not None and data.sample_by not in groups:
        raise DataError(f"data.sample_by ({data.sample_by!r}) is not a group field ({groups})")
    load = lambda files: load_documents(files, data.text_field, groups, data.include)  # noqa: E731
    split_off = not data.valid_files and not shipped
    train = None
    if need_train or split_off:
        train = load(_corpus_files("train") if shipped else list(data.train_files))
    if data.valid_files:
        valid = load(list(data.valid_files))
    elif shipped:
        valid = load(_corpus_files("valid"))
    else:
        if data.valid_fraction == 0 or len(train) < 2:
            raise DataError("no validation data: set data.valid_files or data.valid_fraction > 0")
        split = train.train_test_split(test_size=data.valid_fraction, seed=cfg.run.seed)
        train, valid = split["train"], split["test"]
    return train, valid, groups


def narrowed(data: DataConfig, filters: dict[str, list[str]]) -> DataConfig:
    """``data`` keeping only the documents whose fields also match ``filters`` (field -> allowed
    values): the filters it already has stay, except one on the same field, which is replaced."""
    from dataclasses import replace

    return replace(data, include={**data.include, **{k: list(v) for k, v in filters.items()}})


def with_group_field(cfg: Config, name: str) -> Config:
    """``cfg`` whose data requires, and reports per value of, the group field ``name``."""
    from dataclasses import replace

    groups = list(cfg.data.group_fields or [])
    if cfg.data.group_fields is None and not cfg.data.train_files:
        groups = list(CORPUS_GROUPS)
    if name not in groups:
        groups.append(name)
    return replace(cfg, data=replace(cfg.data, group_fields=groups))


def build_tokenizer(cfg: Config, train: datasets.Dataset) -> Tokenizer:
    """The run's tokenizer: byte-level, BPE trained on ``train``, or loaded from a file."""
    spec = cfg.data.tokenizer
    if spec == "bpe":
        vocab = cfg.data.bpe_vocab_size or cfg.model.vocab_size
        log.info("training a %d-token BPE on %d documents", vocab, len(train))
        texts = (row[cfg.data.text_field] for row in train)
        tokenizer = train_bpe(texts, vocab)
    else:
        try:
            tokenizer = load_tokenizer(spec)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"data.tokenizer: {e}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size}); set model.vocab_size={tokenizer.vocab_size} "
            "or more"
        )
    return tokenizer
