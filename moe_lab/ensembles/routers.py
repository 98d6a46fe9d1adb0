"""Sequence routing for expert ensembles (C-BTM): weights over experts from a context's distance to
the cluster centroids.

``w_j = softmax_j(-d_j / T)`` over the squared Euclidean distances ``d_j`` of the context's
features to the centroids (the C-BTM paper's ``exp(-||h - c_j||^2 / T)``, T = 0.1), then the top k
are kept and renormalised. ``distance="cbtm-code"`` reproduces the released C-BTM code, which
squares the already squared distance (``exp(-||h - c_j||^4 / T)``).

Per-token routing uses the document prefix, updated incrementally: the L2-normalised SVD features
of a tf-idf vector are ``z / ||z||`` with ``z = sum over words of idf_w * components[:, w]`` (the
tf-idf norm cancels), so each completed word adds one precomputed row. The context of a position is
the text up to the last complete word, which makes incremental and from-scratch routing equal.

Shapes: E = experts (clusters), d = SVD dimensions, T = tokens of a document.
"""

from __future__ import annotations

import numpy as np

from moe_lab.data.tokenizer import Tokenizer
from moe_lab.ensembles.clustering.clusterer import Clusterer

__all__ = ["ClusterRouter"]


class ClusterRouter:
    """Weights over E experts for texts or, token by token, for a document prefix.

    Args:
        clusterer: the fitted clusterer whose clusters the experts were trained on.
        temperature: T of the softmax (C-BTM: 0.1).
        top_k: experts kept per context (None: all).
        distance: ``"squared"`` (default, as in the paper) or ``"cbtm-code"`` (distance^4).
    """

    def __init__(
        self,
        clusterer: Clusterer,
        temperature: float = 0.1,
        top_k: int | None = None,
        distance: str = "squared",
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if top_k is not None and not 1 <= top_k <= clusterer.k:
            raise ValueError(f"top_k must be in [1, {clusterer.k}], got {top_k}")
        if distance not in ("squared", "cbtm-code"):
            raise ValueError(f"distance must be 'squared' or 'cbtm-code', got {distance!r}")
        self.clusterer, self.temperature, self.top_k, self.distance = (
            clusterer,
            temperature,
            top_k,
            distance,
        )
        self.n_experts = clusterer.k
        self._centroids = clusterer.kmeans.centroids.astype(np.float64)  # [E, d]
        self._rows = None  # [V, d] idf-weighted SVD rows, built on first prefix routing

    def weights_from_distances(self, dist_NE: np.ndarray) -> np.ndarray:
        """Mixture weights ``[N, E]`` from squared distances ``[N, E]``."""
        d = dist_NE.astype(np.float64)
        score = -(d**2 if self.distance == "cbtm-code" else d) / self.temperature
        w = np.exp(score - score.max(axis=1, keepdims=True))
        if self.top_k is not None and self.top_k < self.n_experts:
            rank = np.argsort(np.argsort(-w, axis=1, kind="stable"), axis=1, kind="stable")
            w = np.where(rank < self.top_k, w, 0.0)  # exactly k kept, ties broken by index
        return w / w.sum(axis=1, keepdims=True)

    def weights(self, texts: list[str]) -> np.ndarray:
        """Mixture weights ``[N, E]`` for whole texts (from-scratch vectorisation)."""
        return self.weights_from_distances(self.clusterer.distances(texts))

    # -- per-token routing over a document prefix -------------------------------------------------
    def _word_rows(self):
        if self._rows is None:
            c = self.clusterer
            self._rows = (c.idf[:, None] * c.components.T).astype(np.float64)  # [V, d]
        return self._rows

    def prefix_weights(self, token_ids: list[int], tokenizer: Tokenizer) -> np.ndarray:
        """``[T, E]``: row t routes the prediction that follows ``token_ids[: t + 1]``.

        The context is the decoded prefix up to its last complete word, vectorised incrementally
        (see the module docstring); equal to :meth:`weights` on that text. Batched: the prefixes'
        new words are counted in one pass and accumulated with one cumulative sum.
        """
        rows = self._word_rows()
        # Where each prefix's complete words end, in characters: decoding every prefix (O(T^2)
        # characters, fine at T ~ 10^3) keeps a tokenizer's own handling of cut characters.
        ids = np.asarray(token_ids)  # slices of an array, not lists: no copy per prefix
        ends, text = [], ""  # text ends as the last prefix: the whole document, of which every
        for text in tokenizer.decode_prefixes(ids):  # prefix up to its complete words is a prefix
            ends.append(len(self.routing_text(text)))
        grows = [t for t in range(len(ends)) if ends[t] > (ends[t - 1] if t else 0)]
        starts = ([0] + [ends[t] for t in grows])[:-1]  # none where no word completes
        segments = [text[a : ends[t]] for a, t in zip(starts, grows, strict=True)]
        z = np.zeros((len(ends), rows.shape[1]))
        if segments:
            z_S = np.cumsum(np.asarray(self.clusterer.term_counts(segments) @ rows), axis=0)
            # token t sees the segments completed at or before it
            seen = np.searchsorted(np.asarray(grows), np.arange(len(ends)), side="right")
            z[seen > 0] = z_S[seen[seen > 0] - 1]
        feats = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        diff = feats[:, None, :] - self._centroids[None]  # [T, E, d]
        return self.weights_from_distances((diff**2).sum(-1))

    def document_weights(self, doc: list[int], tokenizer: Tokenizer) -> np.ndarray:
        """``[len(doc) - 1, E]`` for a packed document ``[BOS, x_1..x_n, EOS]``: row p routes the
        prediction made after its first p + 1 tokens (row 0: the empty context)."""
        return np.concatenate([self.weights([""]), self.prefix_weights(doc[1:-1], tokenizer)])

    @staticmethod
    def routing_text(text: str) -> str:
        """The part of ``text`` that prefix routing sees: up to its last complete word.

        A trailing U+FFFD (a multi-byte character cut by a byte-level tokenizer) belongs to the
        unfinished word too.
        """
        text = text.rstrip("\ufffd")
        end = len(text)
        while end and (text[end - 1].isalnum() or text[end - 1] == "_"):  # what \w matches
            end -= 1
        return text[:end]
