"""A training run as a transformers model directory: weights and config (``LlamaForCausalLM`` or
``MixtralForCausalLM``, see :mod:`moe_lab.interop.hf`) and a tokenizer ``AutoTokenizer`` loads, so
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` continue
text as ``moe-lab generate`` does.

The byte-level tokenizer becomes a byte-level BPE with no merges whose 256 symbols carry the byte
values as ids (GPT-2's byte-to-character table), then BOS, EOS and PAD at 256-258; a BPE tokenizer
is written as it is.
"""

from __future__ import annotations

from pathlib import Path

from moe_lab.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer
from moe_lab.interop.hf import to_hf
from moe_lab.store.checkpoint import load_run

__all__ = ["byte_characters", "export_run", "hf_tokenizer"]

SPECIALS = ("<bos>", "<eos>", "<pad>")  # the byte tokenizer's ids 256, 257, 258


def byte_characters() -> dict[int, str]:
    """GPT-2's table from bytes to printable characters, the alphabet of byte-level BPE:
    printable Latin-1 bytes stand for themselves, the others for characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _byte_level(tokenizer: ByteTokenizer):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in byte_characters().items()}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIALS))  # ids 256, 257, 258, in this order
    assert [backend.token_to_id(t) for t in SPECIALS] == [256, 257, 258]
    return backend, SPECIALS


def hf_tokenizer(tokenizer: Tokenizer):
    """A ``PreTrainedTokenizerFast`` that maps text to the ids ``tokenizer`` does.

    Raises:
        ValueError: a sentencepiece tokenizer (export its ``tokenizer.model`` with transformers'
            own ``LlamaTokenizer`` instead).
    """
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, ByteTokenizer):
        backend, (bos, eos, pad) = _byte_level(tokenizer)
    elif isinstance(tokenizer, BPETokenizer):
        backend = tokenizer.backend
        bos, eos = backend.id_to_token(tokenizer.bos_id), backend.id_to_token(tokenizer.eos_id)
        pad = "<pad>" if backend.token_to_id("<pad>") is not None else None
    else:
        raise ValueError(
            f"exporting a {tokenizer.kind} tokenizer is not supported: only byte and bpe"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad
    )


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``run_dir``'s latest checkpoint and tokenizer as a transformers directory."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: export into a new directory")
    _, model, tokenizer = load_run(run_dir)
    hf_model = to_hf(model)
    hf_tok = hf_tokenizer(tokenizer)
    hf_model.generation_config.bos_token_id = tokenizer.bos_id
    hf_model.generation_config.eos_token_id = tokenizer.eos_id
    hf_model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out
