"""kNN-LM with a datastore that supports opt-out and provenance-filtered retrieval.

Khandelwal et al. 2020 ("Generalization through Memorization: Nearest Neighbor Language Models")
interpolate an LM with a distribution over the next tokens of the training positions whose hidden
states are nearest to the current one; SILO (Min et al. 2023) keeps such a datastore apart from the
parameters so that data owners can opt out. The parts:

- :mod:`~moe_lab.eval.knnlm.datastore`: keys (a chosen hidden state), values (the next token) and
  each entry's provenance (source document, its group values) as memory-mapped arrays plus a
  manifest;
- :mod:`~moe_lab.eval.knnlm.index`: faiss flat L2 and IVF-PQ indexes over stable entry ids;
- :mod:`~moe_lab.eval.knnlm.optout`: remove documents' entries from the arrays and every index, on
  disk;
- :mod:`~moe_lab.eval.knnlm.lm`: the interpolation, held-out tuning of λ, τ, k, and evaluation;
- :mod:`~moe_lab.eval.knnlm.run`: the same for a run directory (``moe-lab knn``,
  ``moe-lab eval --knn``).
"""

from moe_lab.eval.knnlm.datastore import (
    KEY_TYPES,
    Datastore,
    build_datastore,
    model_fingerprint,
    model_keys,
)
from moe_lab.eval.knnlm.index import INDEX_KINDS, IndexSpec, KnnIndex
from moe_lab.eval.knnlm.lm import (
    DEFAULT_GRID,
    TokenScores,
    evaluate_knn,
    interpolate,
    knn_document_nll,
    knn_log_distribution,
    knn_log_prob,
    next_token_log_probs,
    score_tokens,
    split_documents,
    token_log_probs,
    tune_knn,
)
from moe_lab.eval.knnlm.optout import opt_out

__all__ = [
    "DEFAULT_GRID",
    "INDEX_KINDS",
    "KEY_TYPES",
    "Datastore",
    "IndexSpec",
    "KnnIndex",
    "TokenScores",
    "build_datastore",
    "evaluate_knn",
    "interpolate",
    "knn_document_nll",
    "knn_log_distribution",
    "knn_log_prob",
    "model_fingerprint",
    "model_keys",
    "next_token_log_probs",
    "opt_out",
    "score_tokens",
    "split_documents",
    "token_log_probs",
    "tune_knn",
]
