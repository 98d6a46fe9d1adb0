"""Domain discovery as in C-BTM: tf-idf -> TruncatedSVD -> L2 normalisation -> balanced k-means.

tf-idf maps every token that starts with a digit to ``#NUMBER``, which is a stop word like the
English ones, so numbers never become features (C-BTM's NumberNormalizingVectorizer with
``ENGLISH_STOP_WORDS | {"#NUMBER"}``); ``hashing=True`` swaps the vocabulary for a fixed hashed
feature space, for corpora too large to hold one. A fitted clusterer is saved as arrays and JSON
(vocabulary, idf, SVD components, centroids) and never pickled; loading rebuilds the same transform.

Shapes: N = documents, V = tf-idf features, d = SVD components, k = clusters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import sparse

from moe_lab import checksums
from moe_lab.ensembles.clustering.kmeans import BalancedKMeans, nearest_centroid
from moe_lab.store.checkpoint import read_json

__all__ = ["Clusterer"]

_BATCH = 10_000


def _sklearn():
    """The tf-idf and SVD pieces, imported on first use: scikit-learn takes ~1 s to import, which
    every ``moe-lab`` command paid at start-up though few of them cluster."""
    from moe_lab.ensembles.clustering import vectorizers

    return vectorizers


class Clusterer:
    """Fit on documents, then assign any text to its nearest cluster.

    Args:
        k: clusters.
        n_components: SVD dimensions (C-BTM: 100); capped below the tf-idf feature count.
        hashing: hash tokens into ``2 ** hash_bits`` features instead of learning a vocabulary.
        seed: seeds SVD and k-means.
    """

    def __init__(
        self,
        k: int,
        n_components: int = 100,
        hashing: bool = False,
        hash_bits: int = 18,
        seed: int = 0,
    ) -> None:
        self.k, self.n_components, self.seed = k, n_components, seed
        self.hashing, self.hash_bits = hashing, hash_bits
        self.vectorizer = None
        self.idf: np.ndarray | None = None  # [V]
        self.components: np.ndarray | None = None  # [d, V]
        self.kmeans = BalancedKMeans(k, seed=seed)
        self.sizes: list[int] = []

    # -- features ----------------------------------------------------------------------------------
    def _make_vectorizer(self, vocabulary: dict[str, int] | None = None):
        common = dict(lowercase=True, dtype=np.float32)
        if self.hashing:
            return _sklearn().NumberNormalizingHashing(
                n_features=2**self.hash_bits, alternate_sign=False, norm=None, **common
            )
        return _sklearn().NumberNormalizingTfidf(vocabulary=vocabulary, **common)

    def _tfidf(self, texts: list[str]):
        """Sparse tf-idf ``[N, V]`` with the fitted vocabulary / hashing and idf."""
        if self.hashing:
            counts = self.vectorizer.transform(texts)
            transformer = _sklearn().TfidfTransformer()
            transformer.idf_ = self.idf
            return transformer.transform(counts)
        return self.vectorizer.transform(texts)

    def features(self, texts: Iterable[str]) -> np.ndarray:
        """L2-normalised SVD features ``[N, d]`` of ``texts``, computed in batches."""
        if self.components is None:
            raise RuntimeError("Clusterer.features before fit or load")
        texts, out = list(texts), []
        for start in range(0, len(texts), _BATCH):
            z = np.asarray(self._tfidf(texts[start : start + _BATCH]) @ self.components.T)
            norms = np.linalg.norm(z, axis=1, keepdims=True)
            out.append((z / np.maximum(norms, 1e-12)).astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.components.shape[0]), np.float32)

    # -- fitting and assigning ---------------------------------------------------------------------
    def fit(self, texts: Iterable[str]) -> np.ndarray:
        """Fit features and balanced k-means on ``texts``; returns their (balanced) labels."""
        texts = list(texts)
        if len(texts) < self.k:
            raise ValueError(f"need at least k = {self.k} documents to cluster, got {len(texts)}")
        self.vectorizer = self._make_vectorizer()
        if self.hashing:
            transformer = _sklearn().TfidfTransformer().fit(self.vectorizer.transform(texts))
            self.idf = transformer.idf_.astype(np.float32)
        else:
            try:
                self.vectorizer.fit(texts)
            except ValueError as e:  # e.g. only stop words: sklearn says "empty vocabulary"
                raise ValueError(f"cannot build tf-idf features: {e}") from None
            self.idf = self.vectorizer.idf_.astype(np.float32)
        tfidf = self._tfidf(texts)
        n_components = max(1, min(self.n_components, tfidf.shape[1] - 1, len(texts) - 1))
        svd = _sklearn().TruncatedSVD(n_components=n_components, random_state=self.seed)
        svd.fit(tfidf)
        self.components = svd.components_.astype(np.float32)
        labels = self.kmeans.fit(self.features(texts))
        self.sizes = np.bincount(labels, minlength=self.k).tolist()
        return labels

    def recentre(self, texts: Iterable[str], labels: np.ndarray) -> None:
        """Move each centroid to the mean features of the texts ``labels`` gives it: routing by
        another assignment than k-means' (the random-cluster ablation) over the same features."""
        features = self.features(texts)
        self.kmeans.centroids = np.stack(
            [features[labels == c].mean(axis=0) for c in range(self.k)]
        ).astype(np.float32)
        self.sizes = np.bincount(labels, minlength=self.k).tolist()

    def term_counts(self, texts: list[str]):
        """Sparse raw term counts ``[N, V]`` in the fitted feature space (before idf)."""
        if self.hashing:
            return self.vectorizer.transform(texts)  # built with norm=None: counts
        analyze, vocab = self.vectorizer.build_analyzer(), self.vectorizer.vocabulary_
        rows, cols = [], []
        for i, text in enumerate(texts):
            for term in analyze(text):
                if term in vocab:
                    rows.append(i)
                    cols.append(vocab[term])
        data = np.ones(len(rows), dtype=np.float64)
        return sparse.csr_matrix((data, (rows, cols)), shape=(len(texts), len(vocab)))

    def predict(self, texts: Iterable[str]) -> np.ndarray:
        """Nearest-centroid cluster of each text (no balancing)."""
        return self.kmeans.predict(self.features(texts))

    def distances(self, texts: Iterable[str]) -> np.ndarray:
        """Squared distances ``[N, k]`` of each text's features to every centroid."""
        return nearest_centroid(self.features(texts), self.kmeans.centroids)[1]

    def top_terms(self, n: int = 10) -> list[list[str]]:
        """Per cluster, the vocabulary terms its centroid weighs most (empty with hashing)."""
        if self.hashing:
            return [[] for _ in range(self.k)]
        terms = np.array(self.vectorizer.get_feature_names_out())
        weights_kV = self.kmeans.centroids @ self.components
        return [terms[np.argsort(-w)[:n]].tolist() for w in weights_kV]

    # -- persistence: arrays and JSON, never pickle ------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "k": self.k,
            "n_components": self.n_components,
            "hashing": self.hashing,
            "hash_bits": self.hash_bits,
            "seed": self.seed,
            "sizes": self.sizes,
            "stop_words": "sklearn ENGLISH_STOP_WORDS + #NUMBER",
            "format": 1,
        }
        (directory / "clusterer.json").write_text(json.dumps(meta, indent=2))
        if not self.hashing:
            vocab = {t: int(i) for t, i in self.vectorizer.vocabulary_.items()}
            (directory / "vocabulary.json").write_text(
                json.dumps(vocab, ensure_ascii=False), encoding="utf-8"
            )
        np.save(directory / "idf.npy", self.idf)
        np.save(directory / "svd_components.npy", self.components)
        np.save(directory / "centroids.npy", self.kmeans.centroids)
        checksums.record(directory)

    @classmethod
    def load(cls, directory: str | Path) -> Clusterer:
        directory = Path(directory)
        if not (directory / "clusterer.json").is_file():
            raise FileNotFoundError(f"{directory} holds no clusterer.json")
        checksums.verify(directory)
        meta = read_json(directory / "clusterer.json")
        self = cls(
            meta["k"], meta["n_components"], meta["hashing"], meta["hash_bits"], meta["seed"]
        )
        vocab = None
        if not self.hashing:
            vocab = json.loads((directory / "vocabulary.json").read_text(encoding="utf-8"))
        self.vectorizer = self._make_vectorizer(vocab)
        self.idf = np.load(directory / "idf.npy")
        if not self.hashing:
            self.vectorizer.idf_ = self.idf  # with the fixed vocabulary: the fitted transform
        self.components = np.load(directory / "svd_components.npy")
        self.kmeans.centroids = np.load(directory / "centroids.npy")
        self.sizes = meta["sizes"]
        return self
