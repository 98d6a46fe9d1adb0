"""Documents to tokens: loading (datasets), tokenizers, packing, the shipped corpus, and the access
policy over the documents' security domains."""

from moe_lab.data.documents import (
    CORPUS_DIR,
    CORPUS_GROUPS,
    DataError,
    build_tokenizer,
    load_documents,
    load_splits,
    narrowed,
    with_group_field,
)

__all__ = [
    "CORPUS_DIR",
    "CORPUS_GROUPS",
    "DataError",
    "build_tokenizer",
    "load_documents",
    "load_splits",
    "narrowed",
    "with_group_field",
]
