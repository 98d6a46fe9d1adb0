"""Clustering cost vs corpus size: moe_lab's Clusterer fit and assignment, next to sklearn KMeans.

Documents are short (20-word) windows cut from the shipped corpus, so the vocabulary is real. For
each N: fit time (tf-idf + SVD + balanced k-means, k = 16), assignment throughput of new text
(nearest centroid), cluster-size spread, and sklearn ``KMeans(n_init=1)`` on the same SVD features
for reference (unbalanced).

    python bench/clustering.py                        # N = 10k, 100k, 1M (several minutes)
    python bench/clustering.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.cluster import KMeans
from timing import write_json

from moe_lab.config import load_config
from moe_lab.data.documents import load_splits
from moe_lab.ensembles.clustering import Clusterer


def short_documents(n: int, words: int = 20, seed: int = 0) -> list[str]:
    train, _, _ = load_splits(load_config())
    tokens = " ".join(train["text"]).split()
    starts = np.random.default_rng(seed).integers(0, len(tokens) - words, size=n)
    return [" ".join(tokens[s : s + words]) for s in starts]


def run(n: int, k: int) -> dict:
    docs = short_documents(n)
    new = short_documents(min(n, 100_000), seed=1)
    clusterer = Clusterer(k, seed=0)
    start = time.perf_counter()
    clusterer.fit(docs)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    clusterer.predict(new)
    assign_rate = len(new) / (time.perf_counter() - start)
    features = clusterer.features(docs)
    start = time.perf_counter()
    KMeans(n_clusters=k, n_init=1, random_state=0).fit(features)
    sklearn_s = time.perf_counter() - start
    return {
        "n": n,
        "k": k,
        "fit_s": fit_s,
        "kmeans_iterations": clusterer.kmeans.n_iter_run,
        "assign_docs_per_s": assign_rate,
        "size_min": min(clusterer.sizes),
        "size_max": max(clusterer.sizes),
        "sklearn_kmeans_s_on_same_features": sklearn_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--out", default="bench/results/clustering.json")
    args = parser.parse_args()
    print(
        f"{'N':>9s} {'fit s':>8s} {'iters':>6s} {'assign docs/s':>14s} {'sizes':>13s} "
        f"{'sklearn KMeans s':>17s}"
    )
    rows = []
    for n in args.sizes:
        r = run(n, args.k)
        rows.append(r)
        print(
            f"{n:9,d} {r['fit_s']:8.1f} {r['kmeans_iterations']:6d} "
            f"{r['assign_docs_per_s']:14,.0f} {r['size_min']:6d}-{r['size_max']:<6d} "
            f"{r['sklearn_kmeans_s_on_same_features']:17.1f}",
            flush=True,
        )
    write_json(args.out, rows)


if __name__ == "__main__":
    main()
