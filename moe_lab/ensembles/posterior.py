"""BTM's routing by the domain posterior (Li et al. 2022, "Branch-Train-Merge", §4.1): no
clusterer, the experts' own likelihoods of the text decide.

With a uniform prior, the posterior over experts after the prefix ``x_<t`` is Bayes' rule,
``P(j | x_<t) ∝ P(j) · Π_{s<t} p_j(x_s | x_<s)``. ``updating`` recomputes it at every position
from the document so far (every expert must score the whole prefix, so all E of them run);
``cached`` estimates one prior from the final posteriors of a few held-out documents and fixes it
for every document and position (only the k experts it keeps run). Either way the top k experts of
the posterior are kept and their weights renormalised.

Shapes: E = experts, N = predicted tokens of a document.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moe_lab.nn.model import Transformer

__all__ = ["cached_prior", "expert_log_likelihoods", "posterior_weights", "top_k_weights"]


@torch.no_grad()
def expert_log_likelihoods(
    experts: Sequence[Transformer], doc: Sequence[int], seq_len: int, device="cpu"
) -> np.ndarray:
    """``[E, N]``: ``log p_j(x_{s+1} | context)`` of every token after BOS of ``doc``
    (``[BOS, x_1, ..., EOS]``), the document cut into spans of ``seq_len`` predictions as
    evaluation cuts it (each span sees its own tokens only)."""
    ids = torch.as_tensor(list(doc), dtype=torch.long, device=device)
    out = np.zeros((len(experts), len(ids) - 1))
    for start in range(0, len(ids) - 1, seq_len):
        piece = ids[start : start + seq_len + 1]
        inputs, targets = piece[:-1][None], piece[1:][None]
        span = slice(start, start + targets.shape[1])
        for j, expert in enumerate(experts):
            lp = expert(inputs).logits.float().log_softmax(-1)
            out[j, span] = lp.gather(-1, targets[..., None])[0, :, 0].cpu().numpy()
    return out


def top_k_weights(scores_NE: np.ndarray, top_k: int | None) -> np.ndarray:
    """Keep each row's ``top_k`` largest probabilities (None: all) and renormalise them."""
    if top_k is None or top_k >= scores_NE.shape[1]:
        return scores_NE / scores_NE.sum(axis=1, keepdims=True)
    kept = np.zeros_like(scores_NE)
    order = np.argsort(-scores_NE, axis=1, kind="stable")[:, :top_k]
    np.put_along_axis(kept, order, np.take_along_axis(scores_NE, order, axis=1), axis=1)
    return kept / kept.sum(axis=1, keepdims=True)


def posterior_weights(
    loglik_EN: np.ndarray, prior_E: np.ndarray | None = None, top_k: int | None = None
) -> np.ndarray:
    """``[N, E]``: row t weighs the experts for the prediction after the first t + 1 tokens of
    the document (BOS included), by the posterior after the t tokens predicted so far: row 0 is
    the prior (uniform by default)."""
    E, N = loglik_EN.shape
    prior = np.full(E, 1.0 / E) if prior_E is None else np.asarray(prior_E, dtype=np.float64)
    seen = np.concatenate([np.zeros((E, 1)), np.cumsum(loglik_EN, axis=1)[:, :-1]], axis=1)
    log_post = np.log(prior)[:, None] + seen  # [E, N], unnormalised
    post = np.exp(log_post - log_post.max(axis=0, keepdims=True))
    return top_k_weights((post / post.sum(axis=0, keepdims=True)).T, top_k)


def cached_prior(logliks: Sequence[np.ndarray]) -> np.ndarray:
    """``[E]``: the mean over held-out documents of each one's posterior after all its tokens,
    from a uniform prior (BTM's cached prior)."""
    finals = []
    for loglik_EN in logliks:
        total = loglik_EN.sum(axis=1)
        post = np.exp(total - total.max())
        finals.append(post / post.sum())
    return np.mean(finals, axis=0)
