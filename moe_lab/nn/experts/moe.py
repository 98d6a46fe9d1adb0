"""The reference MoE layer: a top-k router, E SwiGLU experts, an optional (gated) shared expert.

Pure PyTorch, CPU and GPU: the numerical oracle for the MegaBlocks backend. Token slots are sorted
by expert so that each expert runs once, on one contiguous segment: in one autograd Function with a
hand-written backward that keeps a third of the activations (:mod:`moe_lab.nn.experts.fused`), or,
as the readable reference it is tested against and under ``torch.compile``, an autograd loop.

Weights use MegaBlocks' GLU layout so checkpoints move between backends unchanged:
``w1`` (gate), ``v1`` (up) and ``w2`` (down, transposed) are each ``[E * F, D]``; expert e owns rows
``[e * F, (e + 1) * F)``, i.e. ``w1.view(E, F, D)[e]`` is Llama's ``w1`` of that expert.

Capacity mode (``capacity_factor`` set) keeps at most ``ceil(factor * k * T / E)`` slots per expert.
Priority (GShard, fairseq): every token's first choice before any second choice, and within the same
choice rank, earlier tokens first. Dropped slots contribute nothing (the residual stream carries the
token on); their fraction is reported in :class:`~moe_lab.nn.routing.topk.RouterStats`.

Shapes: T = tokens, D = model dim, E = experts, K = experts per token, F = expert hidden width,
S = kept (token, slot) pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lab.config import MoEConfig
from moe_lab.nn.experts.dense import SwiGLU
from moe_lab.nn.experts.fused import run_experts
from moe_lab.nn.experts.parallel import dispatch_to_experts
from moe_lab.nn.routing.topk import RouterStats, TopKRouter

__all__ = ["MoE", "capacity", "expert_slots"]


def capacity(cfg: MoEConfig, n_tokens: int) -> int | None:
    """Slots per expert: ``ceil(factor * k * T / E)``, or None when dropless."""
    if cfg.capacity_factor is None:
        return None
    return math.ceil(cfg.capacity_factor * cfg.top_k * n_tokens / cfg.num_experts)


def expert_slots(indices_TK: Tensor, num_experts: int, cap: int | None) -> Tensor:
    """Which (token, slot) assignments are kept under capacity ``cap``: a bool ``[T, K]``."""
    if cap is None:
        return torch.ones_like(indices_TK, dtype=torch.bool)
    T, K = indices_TK.shape
    by_priority = indices_TK.t().reshape(-1)  # [K * T]: all first choices, then all second...
    onehot = F.one_hot(by_priority, num_experts)  # [K * T, E]
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=1) - 1  # place in its expert's queue
    return (position < cap).view(K, T).t()


class MoE(nn.Module):
    """``x [..., D] -> (y [..., D], RouterStats)``; see the module docstring."""

    def __init__(self, dim: int, cfg: MoEConfig, n_layers: int, init_std: float = 0.02) -> None:
        super().__init__()
        E, Fh = cfg.num_experts, cfg.expert_hidden
        self.cfg, self.dim, self.init_std, self.n_layers = cfg, dim, init_std, n_layers
        self.router = TopKRouter(dim, cfg, init_std)
        self.w1 = nn.Parameter(torch.empty(E * Fh, dim))
        self.v1 = nn.Parameter(torch.empty(E * Fh, dim))
        self.w2 = nn.Parameter(torch.empty(E * Fh, dim))
        self.fused = True  # run_experts' fused: the hand-written Function, or the loop
        self.ep_group = None  # expert parallelism: this rank holds E / W experts (experts.parallel)
        self.shared = self.shared_gate = None
        if cfg.shared_expert_hidden > 0:
            self.shared = SwiGLU(dim, cfg.shared_expert_hidden, n_layers, init_std)
        if cfg.shared_expert_gate:
            self.shared_gate = nn.Linear(dim, 1, bias=False)

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        nn.init.normal_(self.w1, std=self.init_std)
        nn.init.normal_(self.v1, std=self.init_std)
        nn.init.normal_(self.w2, std=self.init_std / math.sqrt(2 * self.n_layers))
        if self.shared is not None:
            self.shared.reset_parameters()
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=self.init_std)

    def forward(self, x: Tensor) -> tuple[Tensor, RouterStats]:
        x_TD = x.reshape(-1, self.dim)
        weights_TK, indices_TK, probs_TE, logits_TE = self.router(x_TD)
        kept_TK = expert_slots(indices_TK, self.cfg.num_experts, capacity(self.cfg, len(x_TD)))
        y_TD = self._experts(x_TD, weights_TK, indices_TK, kept_TK)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)[0]
            if self.shared_gate is not None:  # Qwen2-MoE: the token decides how much it takes
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        dropped = 1.0 - kept_TK.float().mean()
        n_seq = x.shape[0] if x.ndim == 3 else 1  # [B, T, D]: B sequences
        stats = self.router.stats(probs_TE, logits_TE, indices_TK, dropped, n_seq)
        return y_TD.view_as(x), stats

    def _experts(
        self, x_TD: Tensor, weights_TK: Tensor, indices_TK: Tensor, kept_TK: Tensor
    ) -> Tensor:
        """Run each expert once on its contiguous segment of slots, then scatter back."""
        K = indices_TK.shape[1]
        slot_S = kept_TK.flatten().nonzero().squeeze(1)  # kept slots, s = t * K + k
        expert_S = indices_TK.flatten()[slot_S]
        order = expert_S.argsort(stable=True)
        slot_S, expert_S = slot_S[order], expert_S[order]
        token_S = slot_S // K
        counts_E = torch.bincount(expert_S, minlength=self.cfg.num_experts)
        weight_S = weights_TK.flatten().index_select(0, slot_S).to(x_TD.dtype)
        if self.ep_group is None:
            return run_experts(
                x_TD, counts_E, self.w1, self.v1, self.w2, token_S, weight_S, self.fused
            )
        x_SD = x_TD.index_select(0, token_S)  # not x_TD[token_S]: see run_experts
        y_SD = dispatch_to_experts(self, x_SD, counts_E, self.ep_group)
        return torch.zeros_like(x_TD).index_add_(0, token_S, y_SD * weight_S[:, None])
