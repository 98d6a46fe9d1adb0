"""kNN-LM: interpolate the model's next-token distribution with one from retrieved neighbours.

``p(y) = (1 - λ) p_LM(y) + λ p_kNN(y)`` with
``p_kNN(y) = Σ_{neighbours j with value y} softmax(-d/τ)_j`` (Khandelwal et al. 2020; d is squared
L2; kNN-LM fixes τ = 1 and λ = 0.25, SILO grid-searches both).
Everything is computed in log space (``logsumexp``), so distant neighbours never underflow to 0.

λ, τ and k are chosen by :func:`tune_knn` on documents that are not reported: SILO searched its
grid on the evaluation set itself, which makes the reported perplexity optimistic.
:func:`split_documents` splits a validation store into a tuning part and a reporting part.

Shapes: B = batch, T = sequence, V = vocabulary, Q = scored tokens, K = neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from moe_lab.data.packing import IGNORE, TokenStore, eval_rows
from moe_lab.eval.evaluate import summarize
from moe_lab.eval.knnlm.datastore import Datastore, model_keys
from moe_lab.nn.losses import token_nll
from moe_lab.nn.model import Transformer

__all__ = [
    "DEFAULT_GRID",
    "TokenScores",
    "evaluate_knn",
    "interpolate",
    "knn_document_nll",
    "knn_log_distribution",
    "knn_log_prob",
    "next_token_log_probs",
    "score_tokens",
    "split_documents",
    "token_log_probs",
    "tune_knn",
]

DEFAULT_GRID = {
    # SILO's λ grid, finer and wider: a weak LM (a short run) can want most weight on the kNN
    "lambdas": (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    # squared L2 grows with the key dim and the norm weights: a wide log grid
    "temperatures": (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
    "ks": (8, 32, 128),
}


def _check(lam: float, temperature: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _neighbour_log_weights(dist: Tensor, temperature: float) -> Tensor:
    """``[Q, K]`` log softmax(-d/τ) over the found neighbours (inf distance: not found)."""
    scores = -dist.double() / temperature
    norm = torch.logsumexp(scores, dim=-1, keepdim=True)
    # A query with no neighbour at all has norm -inf: its weights are all -inf, not NaN.
    return torch.where(torch.isfinite(norm), scores - norm, torch.full_like(scores, -math.inf))


def knn_log_prob(dist: Tensor, vals: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """``[Q]`` log p_kNN(target) from ``dist [Q, K]`` and neighbour values ``vals [Q, K]``.

    ``-inf`` where no neighbour has the target's value.
    """
    logw = _neighbour_log_weights(dist, temperature)
    hit = vals == targets[:, None]
    return torch.logsumexp(logw.masked_fill(~hit, -math.inf), dim=-1)


def knn_log_distribution(dist: Tensor, vals: Tensor, temperature: float, vocab: int) -> Tensor:
    """``[Q, V]`` log p_kNN over the vocabulary (``-inf`` for values no neighbour has)."""
    logw = _neighbour_log_weights(dist, temperature)  # [Q, K]
    index = vals.clamp(min=0).long()
    logw = logw.masked_fill(vals < 0, -math.inf)
    # Scatter-logsumexp: subtract each value's max weight before exp, so nothing underflows.
    top = torch.full((len(dist), vocab), -math.inf, dtype=logw.dtype, device=logw.device)
    top = top.scatter_reduce(1, index, logw, reduce="amax")
    shift = top.gather(1, index)
    mass = torch.zeros_like(top).scatter_add(1, index, torch.exp(logw - shift).nan_to_num(0.0))
    return torch.where(torch.isfinite(top), top + mass.log(), top)


def interpolate(lm_logp: Tensor, knn_logp: Tensor, lam: float) -> Tensor:
    """``log((1 - λ) p_LM + λ p_kNN)`` from log-probabilities of any (equal) shape."""
    _check(lam, 1.0)
    if lam == 0.0:  # exactly the LM (log 0 would also give it, through -inf arithmetic)
        return lm_logp.clone()
    if lam == 1.0:
        return knn_logp.clone()
    return torch.logaddexp(lm_logp + math.log1p(-lam), knn_logp + math.log(lam))


@torch.no_grad()
def next_token_log_probs(
    model: Transformer,
    datastore: Datastore,
    input_ids: Tensor,
    doc_ids: Tensor | None = None,
    *,
    lam: float,
    temperature: float,
    k: int,
    index: str = "flat",
    recompute: bool = True,
    allowed: np.ndarray | None = None,
) -> Tensor:
    """The kNN-LM's next-token log-probabilities ``[B, T, V]`` (fp64) for a batch.

    Per batch only the key dim is checked: call :meth:`Datastore.check` once for the model.

    Args:
        input_ids, doc_ids: ``[B, T]``, as for :meth:`Transformer.hidden_states`.
        lam, temperature, k: interpolation weight, softmax temperature, neighbours.
        index, recompute, allowed: see :meth:`Datastore.search`.
    """
    _check(lam, temperature)
    if model.cfg.dim != datastore.manifest["dim"]:  # the full check is Datastore.check(model)
        raise ValueError(
            f"datastore keys are {datastore.manifest['dim']}-d; the model is {model.cfg.dim}-d"
        )
    keys, h = model_keys(model, input_ids, doc_ids, datastore.key_type)
    lm = torch.log_softmax((h @ model.head_weight.t()).double(), dim=-1).cpu()  # [B, T, V]
    B, T, V = lm.shape
    dist, rows = datastore.search(
        keys.reshape(B * T, -1).float().cpu().numpy(), k, index, recompute, allowed
    )
    vals = _values(datastore, rows)
    knn = knn_log_distribution(torch.from_numpy(dist), vals, temperature, V)
    return interpolate(lm, knn.view(B, T, V), lam)


def _values(datastore: Datastore, rows: np.ndarray) -> Tensor:
    """``[Q, K]`` next-token values of datastore rows; -1 where no neighbour was found."""
    vals = np.where(rows >= 0, np.asarray(datastore.vals)[np.maximum(rows, 0)], -1)
    return torch.from_numpy(vals.astype(np.int64))


@dataclass
class TokenScores:
    """Everything the interpolation needs for each scored token; tuning reuses it for the grid."""

    lm_logp: Tensor  # [Q] fp64 log p_LM(target)
    dist: Tensor  # [Q, K] fp32 squared L2, nearest first (inf: not found)
    vals: Tensor  # [Q, K] int64 neighbour values (-1: not found)
    targets: Tensor  # [Q] int64
    doc_index: np.ndarray  # [Q] int64 source document of each target
    n_docs: int  # documents in the scored store


@torch.no_grad()
def score_tokens(
    model: Transformer,
    datastore: Datastore,
    store: TokenStore,
    *,
    seq_len: int,
    k: int,
    batch_size: int = 8,
    docs: np.ndarray | None = None,
    index: str = "flat",
    recompute: bool = True,
    allowed: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> TokenScores:
    """Run the model and search the datastore once for every target of ``store``'s documents.

    Args:
        docs: the documents to score (default: all), as for :func:`moe_lab.data.packing.eval_rows`.
        k: neighbours kept per token (the largest k that will be tried).
    """
    datastore.check(model)  # hashes the weights: once per pass, not per batch
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {n: [] for n in ("lm", "dist", "vals", "targets", "docs")}
    bar = tqdm(desc="kNN-LM search", unit="tok", disable=None if progress else True, leave=False)
    for batch in eval_rows(store, seq_len, batch_size, docs):
        ids, doc_ids = batch["input_ids"].to(device), batch["doc_ids"].to(device)
        targets = batch["targets"].flatten()
        scored = targets != IGNORE
        keys, h = model_keys(model, ids, doc_ids, datastore.key_type)
        lm = -token_nll(h, model.head_weight, batch["targets"].to(device)).flatten().cpu()
        queries = keys.flatten(0, 1)[scored.to(keys.device)].float().cpu().numpy()
        dist, rows = datastore.search(queries, k, index, recompute, allowed)
        parts["lm"].append(lm[scored].double())
        parts["dist"].append(torch.from_numpy(dist))
        parts["vals"].append(_values(datastore, rows))
        parts["targets"].append(targets[scored])
        parts["docs"].append(batch["doc_index"].flatten()[scored].numpy())
        bar.update(len(queries))
    bar.close()
    model.train(was_training)
    if not parts["lm"]:
        raise ValueError("no documents to score")
    cat = torch.cat
    return TokenScores(
        cat(parts["lm"]),
        cat(parts["dist"]),
        cat(parts["vals"]),
        cat(parts["targets"]),
        np.concatenate(parts["docs"]),
        store.n_docs,
    )


def token_log_probs(scores: TokenScores, lam: float, temperature: float, k: int) -> Tensor:
    """``[Q]`` interpolated log p(target) using the ``k`` nearest of the stored neighbours."""
    _check(lam, temperature)
    if not 1 <= k <= scores.dist.shape[1]:
        raise ValueError(f"k must be in [1, {scores.dist.shape[1]}] (neighbours scored), got {k}")
    knn = knn_log_prob(scores.dist[:, :k], scores.vals[:, :k], scores.targets, temperature)
    return interpolate(scores.lm_logp, knn, lam)


def knn_document_nll(
    scores: TokenScores, lam: float, temperature: float, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats) and scored tokens per document, the shape of ``document_nll``."""
    nll = np.zeros(scores.n_docs, dtype=np.float64)
    count = np.zeros(scores.n_docs, dtype=np.int64)
    np.add.at(nll, scores.doc_index, -token_log_probs(scores, lam, temperature, k).numpy())
    np.add.at(count, scores.doc_index, 1)
    return nll, count


def evaluate_knn(
    model: Transformer,
    datastore: Datastore,
    store: TokenStore,
    *,
    lam: float,
    temperature: float,
    k: int,
    seq_len: int,
    batch_size: int = 8,
    docs: np.ndarray | None = None,
    index: str = "flat",
    recompute: bool = True,
    allowed: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict:
    """kNN-LM loss, perplexity and bits per byte, overall and per group (``summarize``'s shape).

    λ, τ and k are given, chosen beforehand by :func:`tune_knn` on other documents.
    """
    _check(lam, temperature)
    scores = score_tokens(
        model,
        datastore,
        store,
        seq_len=seq_len,
        k=k,
        batch_size=batch_size,
        docs=docs,
        index=index,
        recompute=recompute,
        allowed=allowed,
        device=device,
        progress=progress,
    )
    return summarize(*knn_document_nll(scores, lam, temperature, k), store)


def tune_knn(
    scores: TokenScores,
    lambdas: Sequence[float] = DEFAULT_GRID["lambdas"],
    temperatures: Sequence[float] = DEFAULT_GRID["temperatures"],
    ks: Sequence[int] = DEFAULT_GRID["ks"],
) -> dict:
    """Grid-search λ, τ and k for the lowest mean NLL on the tuning tokens ``scores``.

    ``scores`` must come from tuning documents (:func:`split_documents`), never from the documents
    whose results are reported. ks larger than the neighbours scored are skipped.

    Returns:
        ``{"lambda", "temperature", "k", "loss", "grid": [{"lambda", "temperature", "k",
        "loss"}, ...]}`` (loss: mean NLL per token, nats).
    """
    ks = [k for k in ks if k <= scores.dist.shape[1]]
    if not ks or not lambdas or not temperatures:
        raise ValueError(f"empty grid: ks within {scores.dist.shape[1]} neighbours, got {ks}")
    for lam, temperature in ((lam, t) for lam in lambdas for t in temperatures):
        _check(lam, temperature)
    grid = []
    for k in ks:
        for temperature in temperatures:  # p_kNN once per (k, τ); λ only mixes
            knn = knn_log_prob(scores.dist[:, :k], scores.vals[:, :k], scores.targets, temperature)
            for lam in lambdas:
                loss = -interpolate(scores.lm_logp, knn, lam).mean().item()
                grid.append({"lambda": lam, "temperature": temperature, "k": k, "loss": loss})
    best = min(grid, key=lambda g: g["loss"])
    return {**best, "grid": grid}


def split_documents(
    n_docs: int, tune_fraction: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of document indices into ``(tuning docs, reported docs)``, both sorted."""
    if not 0 < tune_fraction < 1:
        raise ValueError(f"tune_fraction must be in (0, 1), got {tune_fraction}")
    if n_docs < 2:
        raise ValueError(
            f"need at least 2 documents to tune on some and report others, got {n_docs}"
        )
    perm = np.random.default_rng(seed).permutation(n_docs)
    n_tune = min(max(1, round(n_docs * tune_fraction)), n_docs - 1)
    return np.sort(perm[:n_tune]), np.sort(perm[n_tune:])
