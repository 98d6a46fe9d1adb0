"""Load-balancing and router z-losses, in the published forms, combined over MoE layers.

Each MoE layer returns a :class:`~moe_lab.nn.routing.topk.RouterStats`; the model passes the list of
them here. Per layer, with T tokens, E experts and k experts per token:
``f_e`` = fraction of tokens whose top-1 is e, ``c_e`` = (token, slot) assignments to e,
``P_e`` = mean router probability of e, and ``f_ke`` = fraction of tokens whose k-th choice is e.

=============  ==========================================================  =================
name           formula                                                     balanced / one
=============  ==========================================================  =================
switch         sum over layers of  E * sum_e f_e P_e  (Fedus et al. 2021;     1 per layer / E
               fairseq's E^2 * mean(me * ce), summed over layers)
olmo           sum over layers of  E / (k T) * sum_e c_e P_e  (OLMo-core)     1 per layer / E/k
megablocks     mean over layers of the same (MegaBlocks'                      1 / E/k
               batched_load_balancing_loss with num_layers = MoE layers)
mixtral        E * sum_{k,e} f_ke P_e  with f and P over all layers'          k / E
               tokens concatenated (transformers' load_balancing_loss_func)
=============  ==========================================================  =================

"balanced" is uniform routing; "one" is every token on one expert with probability 1 (its other
k - 1 choices get probability 0, hence E/k where c counts every slot).

Granularity (``lbl_granularity``) decides over which tokens f, c and P are taken. ``micro_batch``:
the tokens of one forward pass; under data parallelism the counts are summed over the ranks (P
stays local: the gradients' average over ranks then equals one process on the whole micro-batch).
``sequence``: each sequence alone, the loss averaged over sequences (DeepSeek-V3's sequence-wise
balance loss). ``global_batch``: the counts are also summed over the micro-batches of the optimizer
step accumulated so far, so that with a single micro-batch per step the loss sees the whole global
batch on every rank (Qiu et al. 2025 report that global-batch balancing lets experts specialise by
domain); P is the micro-batch's own, since it carries the gradient. The weight
(``lbl_weight``) multiplies the value in the table. The z-loss (Zoph et al. 2022, ST-MoE) is
``mean_t logsumexp(logits_t)^2`` per layer, summed over layers, times ``z_loss_weight``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lab.config import LBL_FORMS, MoEConfig
from moe_lab.nn.routing.topk import RouterStats

__all__ = ["LBL_FORMS", "load_balancing_loss", "moe_aux_loss", "z_loss"]


def _views(s: RouterStats) -> tuple[Tensor, Tensor]:
    """``(counts [S, K, E], probs [S, E])``: per sequence with ``lbl_granularity=sequence``, else
    one row (the micro-batch, or the global batch so far)."""
    if s.seq_counts_SKE is not None:
        return s.seq_counts_SKE, s.seq_probs_SE
    return s.slot_counts_KE[None], s.probs_E[None]


def _per_layer_olmo(s: RouterStats) -> Tensor:
    counts_SKE, probs_SE = _views(s)
    K, E = counts_SKE.shape[1:]
    tokens_S = counts_SKE[:, 0].sum(-1)  # every token has exactly one first choice
    return (E / (K * tokens_S) * (counts_SKE.sum(1) * probs_SE).sum(-1)).mean()


def _per_layer_switch(s: RouterStats) -> Tensor:
    counts_SKE, probs_SE = _views(s)
    first_SE = counts_SKE[:, 0]
    E = first_SE.shape[-1]
    return (E * (first_SE / first_SE.sum(-1, keepdim=True) * probs_SE).sum(-1)).mean()


def load_balancing_loss(stats: list[RouterStats], form: str) -> Tensor:
    """The unweighted balancing loss of ``form`` over the MoE layers' stats (see module doc);
    with per-sequence stats, the mean over sequences of each sequence's loss."""
    if form not in LBL_FORMS:
        raise ValueError(f"unknown load-balancing loss {form!r}; choose one of {LBL_FORMS}")
    if form == "none" or not stats:
        return torch.zeros((), device=stats[0].probs_E.device if stats else None)
    if form == "switch":
        return torch.stack([_per_layer_switch(s) for s in stats]).sum()
    if form == "olmo":
        return torch.stack([_per_layer_olmo(s) for s in stats]).sum()
    if form == "megablocks":
        return torch.stack([_per_layer_olmo(s) for s in stats]).mean()
    views = [_views(s) for s in stats]
    E = views[0][0].shape[-1]
    f_SKE = torch.stack([c / c[:, :1].sum(-1, keepdim=True) for c, _ in views]).mean(dim=0)
    p_SE = torch.stack([p for _, p in views]).mean(dim=0)
    return (E * (f_SKE * p_SE[:, None]).sum((-2, -1))).mean()


def z_loss(stats: list[RouterStats]) -> Tensor:
    """Router z-loss, summed over layers (unweighted)."""
    return torch.stack([s.lse_sq for s in stats]).sum()


def moe_aux_loss(stats: list[RouterStats], cfg: MoEConfig) -> Tensor:
    """``lbl_weight * load_balancing_loss + z_loss_weight * z_loss`` over the MoE layers."""
    total = cfg.lbl_weight * load_balancing_loss(stats, cfg.lbl)
    if cfg.z_loss_weight > 0:
        total = total + cfg.z_loss_weight * z_loss(stats)
    return total
