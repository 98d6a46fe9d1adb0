"""Balanced k-means: equal-size clusters while fitting, plain nearest centroid when assigning.

C-BTM balances with an auction over an N x N assignment problem, which does not scale past ~10^5
documents. Here each iteration's balanced assignment is a deferred-acceptance matching: every
unplaced point proposes to its nearest cluster it has not yet been refused by, and each cluster
keeps the ``floor(N / k)`` closest proposers and refuses the rest. The result is stable (no point
and cluster both prefer each other to their partners); each vectorised round is one sort, and a
refused point never proposes to the same cluster again, so it terminates (in a few rounds when the
clusters are well separated); the ``N mod k`` points left over then go to their nearest distinct
clusters, so every size is ``floor(N / k)`` or ``ceil(N / k)``.

Shapes: N = points, d = feature dimension, k = clusters.
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["BalancedKMeans", "balanced_assign", "nearest_centroid"]


def _sq_distances(x_Nd: np.ndarray, c_kd: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[N, k]``."""
    d = (x_Nd**2).sum(1)[:, None] - 2 * x_Nd @ c_kd.T + (c_kd**2).sum(1)[None, :]
    return np.maximum(d, 0, out=d)


def _deferred_acceptance(
    dist_Nk: np.ndarray, prefs_Nk: np.ndarray, caps_k: np.ndarray
) -> np.ndarray:
    """Points propose nearest-first; cluster c keeps its ``caps_k[c]`` closest proposers.

    Returns labels, -1 for points every cluster refused (only when ``caps_k.sum() < N``).
    """
    N, k = dist_Nk.shape
    choice_N = np.zeros(N, dtype=np.int64)  # how many clusters refused the point so far
    labels = np.full(N, -1, dtype=np.int64)
    free = np.arange(N)
    while len(free):
        target = prefs_Nk[free, choice_N[free]]
        held = np.flatnonzero(labels >= 0)
        cand = np.concatenate([held, free])
        cand_cluster = np.concatenate([labels[held], target])
        order = np.lexsort((dist_Nk[cand, cand_cluster], cand_cluster))  # by cluster, then distance
        cand, cand_cluster = cand[order], cand_cluster[order]
        starts = np.searchsorted(cand_cluster, np.arange(k))
        keep = np.arange(len(cand)) - starts[cand_cluster] < caps_k[cand_cluster]
        labels[cand[keep]] = cand_cluster[keep]
        refused = cand[~keep]
        labels[refused] = -1
        choice_N[refused] += 1
        free = refused[choice_N[refused] < k]
    return labels


def balanced_assign(dist_Nk: np.ndarray) -> np.ndarray:
    """Labels ``[N]``: a stable matching with cluster sizes ``floor``/``ceil(N / k)``."""
    N, k = dist_Nk.shape
    if N < k:
        raise ValueError(f"balanced assignment needs at least k = {k} points, got {N}")
    prefs_Nk = np.argsort(dist_Nk, axis=1, kind="stable")  # each point's clusters, nearest first
    caps_k = np.full(k, N // k)
    labels = _deferred_acceptance(dist_Nk, prefs_Nk, caps_k)
    leftover = np.flatnonzero(labels < 0)  # exactly N mod k points
    if len(leftover):
        # The clusters the leftovers reach first (nearest-first, one each) get the extra slots;
        # matching again with those capacities keeps the result stable for every point.
        taken = np.zeros(k, dtype=bool)
        for i in leftover[np.argsort(dist_Nk[leftover].min(axis=1), kind="stable")]:
            taken[int(np.argmin(np.where(taken, np.inf, dist_Nk[i])))] = True
        labels = _deferred_acceptance(dist_Nk, prefs_Nk, caps_k + taken)
    return labels


def nearest_centroid(x_Nd: np.ndarray, centroids_kd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels ``[N]``, squared distances ``[N, k]``) with faiss exact L2 search."""
    x = np.ascontiguousarray(x_Nd, dtype=np.float32)
    index = faiss.IndexFlatL2(centroids_kd.shape[1])
    index.add(np.ascontiguousarray(centroids_kd, dtype=np.float32))
    k = centroids_kd.shape[0]
    dist, idx = index.search(x, k)  # all k, sorted: we want the full distance matrix
    dist_Nk = np.empty_like(dist)
    np.put_along_axis(dist_Nk, idx, dist, axis=1)
    return idx[:, 0].astype(np.int64), dist_Nk


class BalancedKMeans:
    """k-means whose fitting assignments are balanced (see the module docstring).

    Args:
        k: number of clusters.
        n_iter: maximum Lloyd iterations.
        tol: stop when the largest squared centroid move is below this.
        seed: seeds the k-means++ initialisation.
    """

    def __init__(self, k: int, n_iter: int = 30, tol: float = 1e-6, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        self.k, self.n_iter, self.tol, self.seed = k, n_iter, tol, seed
        self.centroids: np.ndarray | None = None
        self.n_iter_run = 0

    def _init(self, x_Nd: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """k-means++ seeding (Arthur & Vassilvitskii 2007) on up to 10^5 sampled points."""
        sample = x_Nd[rng.choice(len(x_Nd), size=min(len(x_Nd), 100_000), replace=False)]
        centroids = [sample[rng.integers(len(sample))]]
        closest = _sq_distances(sample, np.array(centroids))[:, 0]
        for _ in range(1, self.k):
            probs = closest / closest.sum() if closest.sum() > 0 else None
            centroids.append(sample[rng.choice(len(sample), p=probs)])
            closest = np.minimum(closest, _sq_distances(sample, centroids[-1][None])[:, 0])
        return np.array(centroids, dtype=np.float32)

    def fit(self, x_Nd: np.ndarray) -> np.ndarray:
        """Fit on ``x [N, d]``; returns the balanced labels of the training points."""
        x_Nd = np.asarray(x_Nd, dtype=np.float32)
        if len(x_Nd) < self.k:
            raise ValueError(f"need at least k = {self.k} documents to cluster, got {len(x_Nd)}")
        rng = np.random.default_rng(self.seed)
        centroids = self._init(x_Nd, rng)
        for it in range(1, self.n_iter + 1):
            labels = balanced_assign(_sq_distances(x_Nd, centroids))
            new = np.stack([x_Nd[labels == c].mean(axis=0) for c in range(self.k)])
            shift = float(((new - centroids) ** 2).sum(axis=1).max())
            centroids, self.n_iter_run = new.astype(np.float32), it
            if shift < self.tol:
                break
        self.centroids = centroids
        return balanced_assign(_sq_distances(x_Nd, centroids))

    def predict(self, x_Nd: np.ndarray) -> np.ndarray:
        """Nearest centroid, no balancing (as C-BTM assigns new text)."""
        if self.centroids is None:
            raise RuntimeError("BalancedKMeans.predict before fit or load")
        return nearest_centroid(x_Nd, self.centroids)[0]
