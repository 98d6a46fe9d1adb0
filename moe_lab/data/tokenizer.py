"""Tokenizers: byte-level (no training), BPE trained with ``tokenizers``, or a file from disk.

All of them expose one small interface, :class:`Tokenizer`: ``encode``, ``decode``, ``vocab_size``
and the ``bos_id`` / ``eos_id`` that packing puts around every document. A tokenizer is saved into
a run directory (``tokenizer/``) so evaluation and generation decode exactly what training encoded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from moe_lab import checksums

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "train_bpe",
]

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


class Tokenizer:
    """What packing, evaluation and generation need from a tokenizer."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def decode_prefixes(self, ids: np.ndarray) -> Iterator[str]:
        """``decode(ids[: t + 1])`` for every t: what prefix routing reads, token by token."""
        for t in range(len(ids)):
            yield self.decode(ids[: t + 1])

    def save(self, directory: Path) -> None:
        """Write the tokenizer into ``directory`` (what :func:`load_tokenizer` reads back), with
        the checksums of its files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._write(directory)
        checksums.record(directory)

    def _write(self, directory: Path) -> None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hash that changes whenever the mapping from text to ids would."""
        raise NotImplementedError


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character byte-level BPE writes it as."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _int_list(ids: Iterable[int]) -> list[int]:
    """Python ints, as the ``tokenizers`` and sentencepiece decoders want (not numpy's)."""
    return ids.tolist() if isinstance(ids, np.ndarray) else list(ids)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, then BOS 256, EOS 257, PAD 258: nothing to train or download."""

    kind = "byte"
    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(ids if isinstance(ids, (list, np.ndarray)) else list(ids), dtype=np.int64)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def _write(self, directory: Path) -> None:
        (directory / "tokenizer_config.json").write_text(json.dumps({"kind": "byte"}))

    def fingerprint(self) -> str:
        return "byte"


class BPETokenizer(Tokenizer):
    """A ``tokenizers`` tokenizer loaded from (or saved as) ``tokenizer.json``."""

    kind = "bpe"

    def __init__(self, tok) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = _special_id(tok, (EOS, "<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>"))
        # GPT-2's, OLMo's and Qwen's tokenizers have no BOS: their end-of-text token separates
        # documents on both sides, so it opens them too
        self.bos_id = _special_id(tok, (BOS, "<bos>", "<s>", "<|begin_of_text|>"), self.eos_id)

    @classmethod
    def from_file(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{path} is not a readable tokenizer.json ({e})") from None
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_int_list(ids))

    def decode_prefixes(self, ids: np.ndarray) -> Iterator[str]:
        """A byte-level BPE's prefixes from its tokens' bytes, one join for the document and a
        C decode per prefix, as its decoder does (lossy UTF-8, special tokens skipped)."""
        table = self._token_bytes()
        if table is None:  # another decoder: the general (slower) way
            yield from super().decode_prefixes(ids)
            return
        pieces = [table[i] for i in _int_list(ids)]
        data, end = b"".join(pieces), 0
        for piece in pieces:
            end += len(piece)
            yield data[:end].decode("utf-8", errors="replace")

    @functools.cache  # noqa: B019 -- one table per tokenizer, which lives as long as its users
    def _token_bytes(self) -> list[bytes] | None:
        from tokenizers import decoders

        if not isinstance(self._tok.decoder, decoders.ByteLevel):
            return None
        to_byte = {c: b for b, c in _gpt2_byte_chars().items()}
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        table = []
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            skip = token is None or token in special
            table.append(b"" if skip else bytes(to_byte[c] for c in token))
        return table

    def _write(self, directory: Path) -> None:
        self._tok.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps({"kind": "bpe"}))

    def fingerprint(self) -> str:
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok


def _special_id(tok, candidates: tuple[str, ...], default: int | None = None) -> int:
    for name in candidates:
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    if default is not None:
        return default
    raise ValueError(f"tokenizer has none of the special tokens {candidates}; add one of them")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file (Llama 1/2, XGLM); needs ``pip install sentencepiece``."""

    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(
                f"loading {path} needs sentencepiece: pip install sentencepiece"
            ) from e
        self._path = Path(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a readable sentencepiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"sentencepiece model {path} defines no BOS or EOS piece")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(_int_list(ids))

    def _write(self, directory: Path) -> None:
        shutil.copyfile(self._path, directory / "tokenizer.model")
        (directory / "tokenizer_config.json").write_text(json.dumps({"kind": "sentencepiece"}))

    def fingerprint(self) -> str:
        return hashlib.sha256(self._path.read_bytes()).hexdigest()


def train_bpe(texts: Iterator[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) with BOS/EOS/PAD specials.

    Args:
        texts: training documents; iterated once.
        vocab_size: total size including the 256 byte symbols and the 3 specials.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 259:
        raise ValueError(
            f"BPE vocab_size must be at least 259 (bytes + specials), got {vocab_size}"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """``"byte"``, a ``tokenizer.json``, a sentencepiece ``.model``, or a saved ``tokenizer/``."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        checksums.verify(path)
        config = path / "tokenizer_config.json"
        kind = json.loads(config.read_text())["kind"] if config.is_file() else None
        if kind == "byte":
            return ByteTokenizer()
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise FileNotFoundError(f"{path} holds no tokenizer.json or tokenizer.model")
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {str(spec)!r} is neither 'byte', 'bpe' nor an existing file"
        )
    if path.suffix == ".json":
        return BPETokenizer.from_file(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(f"unknown tokenizer file type {path.name!r}: expected .json or .model")
