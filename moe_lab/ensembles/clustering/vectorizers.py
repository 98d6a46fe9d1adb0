"""C-BTM's tf-idf vectorizers: every token that starts with a digit becomes ``#NUMBER``, a stop
word like the English ones (C-BTM's NumberNormalizingVectorizer with
``ENGLISH_STOP_WORDS | {"#NUMBER"}``). Only :mod:`~moe_lab.ensembles.clustering.clusterer` imports
this module, when it first needs scikit-learn."""

from __future__ import annotations

from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import (
    ENGLISH_STOP_WORDS,
    HashingVectorizer,
    TfidfTransformer,
    TfidfVectorizer,
)

__all__ = ["NumberNormalizingHashing", "NumberNormalizingTfidf", "TfidfTransformer", "TruncatedSVD"]

NUMBER = "#NUMBER"
STOP_WORDS = frozenset(ENGLISH_STOP_WORDS | {NUMBER})


def _numbers_normalised(tokenize):
    """Normalise numbers, then drop stop words: here, not in sklearn, whose stop-word check
    would tokenize "#NUMBER" to "number" and let it through."""

    def tokens(text: str) -> list[str]:
        normalised = (NUMBER if t[0].isdigit() else t for t in tokenize(text))
        return [t for t in normalised if t not in STOP_WORDS]

    return tokens


class NumberNormalizingTfidf(TfidfVectorizer):
    def build_tokenizer(self):
        return _numbers_normalised(super().build_tokenizer())


class NumberNormalizingHashing(HashingVectorizer):
    def build_tokenizer(self):
        return _numbers_normalised(super().build_tokenizer())
