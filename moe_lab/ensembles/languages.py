"""Languages as experts' domains (X-ELM): how alike languages are, and how they group.

Similarity is the cosine of character n-gram tf-idf profiles; groups come from agglomerative
clustering of that table or from balanced k-means on its rows.
"""

from __future__ import annotations

import numpy as np

from moe_lab.config import ConfigError
from moe_lab.ensembles.clustering.kmeans import BalancedKMeans

__all__ = ["group_languages", "language_similarity"]


def language_similarity(
    texts: dict[str, list[str]], max_chars: int = 200_000
) -> tuple[list[str], np.ndarray]:
    """Cosine similarity ``[L, L]`` of the languages' character n-gram profiles.

    Each language's profile is the tf-idf vector (sublinear tf) of the character 1-3-grams of its
    first ``max_chars`` characters of text, so that large languages do not dominate.
    """
    # scikit-learn is imported where it is used: it takes ~1 s, which every command paid at start-up
    from sklearn.feature_extraction.text import TfidfVectorizer

    langs = sorted(texts)
    corpus = []
    for lang in langs:
        joined = "\n".join(texts[lang])
        corpus.append(joined[:max_chars])
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True)
    profiles = vectorizer.fit_transform(corpus)  # rows are L2-normalised
    return langs, np.asarray((profiles @ profiles.T).todense())


def group_languages(
    langs: list[str], similarity: np.ndarray, n_groups: int, method: str = "similarity"
) -> dict[str, list[str]]:
    """Expert name (its languages joined by ``+``) -> languages, in a stable order."""
    if not 1 <= n_groups <= len(langs):
        raise ConfigError(f"xelm.n_groups ({n_groups}) must be in [1, {len(langs)} languages]")
    if method not in ("similarity", "kmeans"):
        raise ConfigError(f"unknown grouping {method!r}")
    if n_groups == 1:  # nothing to cluster (and sklearn refuses to cluster one language)
        labels = [0] * len(langs)
    elif method == "similarity":
        from sklearn.cluster import AgglomerativeClustering  # see language_similarity

        distance = np.clip(1.0 - similarity, 0.0, None)
        labels = AgglomerativeClustering(
            n_clusters=n_groups, metric="precomputed", linkage="average"
        ).fit_predict(distance)
    elif method == "kmeans":
        # Rows of the similarity table embed each language by its closeness to all others.
        labels = BalancedKMeans(n_groups, seed=0).fit(similarity)
    groups = [
        sorted(lang for lang, g in zip(langs, labels, strict=True) if g == c) for c in set(labels)
    ]
    groups.sort()
    return {"+".join(g): g for g in groups}
