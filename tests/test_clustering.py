import json
import subprocess
import sys

import numpy as np
import pytest

from moe_lab.config import load_config
from moe_lab.data.documents import load_splits
from moe_lab.ensembles.clustering import (
    BalancedKMeans,
    Clusterer,
    balanced_assign,
    nearest_centroid,
)


@pytest.mark.parametrize("n, k", [(3, 3), (4, 3), (10, 3), (1000, 7), (5000, 16)])
def test_balanced_sizes_are_within_one_of_n_over_k(n, k):
    dist = np.random.default_rng(n).random((n, k)).astype(np.float32) ** 3  # skewed preferences
    sizes = np.bincount(balanced_assign(dist), minlength=k)
    assert sizes.sum() == n
    assert sizes.min() >= n // k and sizes.max() <= -(-n // k)


def test_balanced_assignment_is_stable():
    """No point and cluster both prefer each other to their partners (outside the leftovers)."""
    rng = np.random.default_rng(1)
    n, k = 603, 6  # 603 % 6 = 3 leftovers take the extra slots
    dist = rng.random((n, k))
    labels = balanced_assign(dist)
    mine = dist[np.arange(n), labels]
    worst_member = np.array([dist[labels == c, c].max() for c in range(k)])
    for i in range(n):
        for c in range(k):
            assert not (dist[i, c] < mine[i] and dist[i, c] < worst_member[c]), (i, c)


def test_balanced_kmeans_recovers_equal_blobs_and_predicts_nearest():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 5
    x = np.concatenate([c + rng.normal(size=(50, 8)) for c in centers]).astype(np.float32)
    km = BalancedKMeans(4, seed=0)
    labels = km.fit(x)
    truth = np.repeat(np.arange(4), 50)
    assert all(len(set(truth[labels == c])) == 1 for c in range(4))
    brute = ((x[:, None] - km.centroids[None]) ** 2).sum(-1)
    idx, dist = nearest_centroid(x, km.centroids)
    assert np.array_equal(km.predict(x), brute.argmin(1)) and np.array_equal(idx, brute.argmin(1))
    np.testing.assert_allclose(dist, brute, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at least k = 4"):
        BalancedKMeans(4).fit(x[:3])


@pytest.fixture(scope="module")
def three_domains():
    cfg = load_config(overrides=["data.include.domain=[literature,religion,code]"])
    train, valid, _ = load_splits(cfg)
    domains = np.array(train["domain"])
    # equal shares: balanced clustering assumes domains of equal size
    idx = np.concatenate(
        [np.flatnonzero(domains == d)[:50] for d in ("literature", "religion", "code")]
    )
    texts = [train[int(i)]["text"] for i in idx]
    return texts, domains[idx], valid["text"], np.array(valid["domain"])


def _purity(labels, truth):
    return sum(
        np.unique(truth[labels == c], return_counts=True)[1].max() for c in np.unique(labels)
    ) / len(labels)


@pytest.mark.parametrize("hashing", [False, True])
def test_three_real_domains_are_recovered(three_domains, hashing):
    texts, truth, valid_texts, valid_truth = three_domains
    clusterer = Clusterer(3, hashing=hashing, hash_bits=14, seed=0)
    labels = clusterer.fit(texts)
    assert clusterer.sizes == [50, 50, 50]
    assert _purity(labels, truth) >= 0.9
    assert _purity(clusterer.predict(valid_texts), valid_truth) >= 0.9
    if not hashing:
        terms = {t for cluster in clusterer.top_terms(10) for t in cluster}
        assert {"unto", "return"} <= terms


@pytest.mark.parametrize("hashing", [False, True])
def test_save_load_reproduces_features_and_assignments_exactly(three_domains, tmp_path, hashing):
    texts, _, valid_texts, _ = three_domains
    clusterer = Clusterer(3, n_components=20, hashing=hashing, hash_bits=12, seed=1)
    clusterer.fit(texts)
    clusterer.save(tmp_path)
    assert not list(tmp_path.glob("*.pkl"))
    again = Clusterer.load(tmp_path)
    assert np.array_equal(again.features(valid_texts), clusterer.features(valid_texts))
    assert np.array_equal(again.predict(valid_texts), clusterer.predict(valid_texts))
    assert again.sizes == clusterer.sizes


def test_numbers_are_one_token_and_a_stop_word():
    texts = [
        "apple banana 1999",
        "apple cherry 2024 42",
        "banana cherry 7 apple",
        "durian melon 3",
        "melon 2 durian",
    ]
    clusterer = Clusterer(2, n_components=2, seed=0)
    clusterer.fit(texts)
    vocab = clusterer.vectorizer.vocabulary_
    assert "#NUMBER" not in vocab and not any(t[0].isdigit() for t in vocab)
    assert np.array_equal(clusterer.features(["apple 1"]), clusterer.features(["apple 99999"]))


def test_cluster_command_writes_clusterer_and_one_assignment_per_document(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "moe_lab", "cluster", "cluster.k=4", f"run.dir={tmp_path}"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    train, valid, _ = load_splits(load_config())
    lines = (tmp_path / "assignments" / "train.jsonl").read_text().splitlines()
    assert len(lines) == len(train)
    sizes = np.bincount([json.loads(x)["cluster"] for x in lines], minlength=4)
    assert sizes.max() - sizes.min() <= 1
    assert len((tmp_path / "assignments" / "valid.jsonl").read_text().splitlines()) == len(valid)
    assert Clusterer.load(tmp_path / "clusterer").k == 4
    again = subprocess.run(
        [sys.executable, "-m", "moe_lab", "cluster", f"run.dir={tmp_path}"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "already holds a run" in again.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_lab",
            "cluster",
            "cluster.k=100000",
            f"run.dir={tmp_path / 'bad'}",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "cluster.k (100000) exceeds" in bad.stderr


def test_random_clusters_keep_the_sizes_but_ignore_the_content(tmp_path):
    from moe_lab.ensembles.clustering.run import cluster_documents

    def labels(method, seed, name):
        cfg = load_config(overrides=["cluster.k=3", f"cluster.method={method}", f"run.seed={seed}"])
        cfg.run.dir = str(tmp_path / name)
        cluster_documents(cfg)
        lines = (tmp_path / name / "assignments" / "train.jsonl").read_text().splitlines()
        return np.array([json.loads(x)["cluster"] for x in lines])

    kmeans, random, again = (
        labels("kmeans", 0, "k"),
        labels("random", 0, "r"),
        labels("random", 0, "r2"),
    )
    assert np.array_equal(np.bincount(random), np.bincount(kmeans))  # the same balanced sizes
    assert np.array_equal(random, again)  # seeded
    domains = np.array(load_splits(load_config())[0]["domain"])

    def purity(lab):  # mean share of each cluster's most common domain
        return np.mean(
            [np.unique(domains[lab == c], return_counts=True)[1].max() for c in range(3)]
        ) / (len(lab) / 3)

    assert purity(kmeans) > purity(random) + 0.2  # k-means groups the domains, random mixes them


def test_random_clusters_route_by_their_own_centroids(tmp_path):
    """The random-cluster ablation routes like its twin, through centroids of its own clusters."""
    from moe_lab.ensembles.clustering import Clusterer
    from moe_lab.ensembles.clustering.run import cluster_documents

    cfg = load_config(overrides=["cluster.k=3", "cluster.method=random"])
    cfg.run.dir = str(tmp_path / "r")
    cluster_documents(cfg)
    clusterer = Clusterer.load(tmp_path / "r" / "clusterer")
    train = load_splits(cfg)[0]["text"]
    lines = (tmp_path / "r" / "assignments" / "train.jsonl").read_text().splitlines()
    labels = [json.loads(x)["cluster"] for x in lines]
    features = clusterer.features(train)
    for c in range(3):
        rows = [f for f, label in zip(features, labels, strict=True) if label == c]
        np.testing.assert_allclose(clusterer.kmeans.centroids[c], np.mean(rows, axis=0), atol=1e-6)
