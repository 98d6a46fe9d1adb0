"""Token-choice top-k router: each token picks its k experts from fp32 softmax or sigmoid scores.

Shapes: T = tokens, D = model dim, E = experts, K = experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lab.config import MoEConfig

__all__ = ["RouterStats", "TopKRouter"]


class RouterStats(NamedTuple):
    """What one MoE layer's routing produced: inputs of the balancing losses, and telemetry.

    ``probs_E`` and ``lse_sq`` carry gradients (they feed the losses); the rest are counts.
    """

    probs_E: Tensor  # [E] mean router probability over tokens
    # [K, E] tokens whose k-th choice is e (before any dropping); lbl_granularity=global_batch:
    # summed over the optimizer step's micro-batches so far
    slot_counts_KE: Tensor
    lse_sq: Tensor  # [] mean over tokens of logsumexp(logits)^2, the z-loss term
    dropped: Tensor  # [] fraction of (token, slot) assignments dropped by capacity
    entropy: Tensor  # [] mean entropy of the router distribution (nats)
    # lbl_granularity=sequence only: the same two per sequence, S = sequences
    seq_probs_SE: Tensor | None = None
    seq_counts_SKE: Tensor | None = None


class TopKRouter(nn.Module):
    """``x_TD -> (weights_TK, indices_TK, probs_TE, logits_TE)``.

    Scores are computed in fp32 (torchtitan: "to avoid loss explosion"). With
    ``bias_update_rate > 0`` a per-expert bias is added to the scores for *selection only*
    (DeepSeek-V3's aux-loss-free balancing); :meth:`update_bias` moves it against the load.
    ``tokens_per_expert`` counts assignments since the last bias update, in training only.

    :meth:`restrict` limits routing to a subset of experts (an access policy, see
    :mod:`moe_lab.families.ifc`): the others are masked to ``-inf`` *before* the softmax and the
    top-k, so they get exactly zero weight and no token, and k shrinks to the number of experts
    allowed.
    """

    def __init__(self, dim: int, cfg: MoEConfig, init_std: float = 0.02) -> None:
        super().__init__()
        self.cfg, self.init_std = cfg, init_std
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        # Assignments counted in training since the last bias update (every optimizer step when
        # bias_update_rate > 0): input to that update and telemetry, not checkpoint state.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
        # lbl_granularity=global_batch: the loads of the optimizer step's micro-batches so far,
        # cleared by reset_step_counts after every step (moe_lab.train.hooks.GlobalBatchLoads)
        self.register_buffer("step_counts_KE", torch.zeros(0), persistent=False)
        self.register_buffer("allowed", None, persistent=False)  # bool [E]; None: every expert
        self.n_allowed = cfg.num_experts  # a Python int, so forward needs no host sync
        # Data parallelism: in training, the expert loads in the stats are summed over this
        # process group, so the balancing losses see the global batch's load
        # (moe_lab.train.distributed)
        self.load_group = None

    def restrict(self, experts: list[int] | None) -> None:
        """Route only to ``experts`` (indices), or to every expert again with None."""
        if experts is None:
            self.allowed, self.n_allowed = None, self.cfg.num_experts
            return
        E = self.cfg.num_experts
        if not experts or any(not 0 <= e < E for e in experts):
            raise ValueError(f"allowed experts must be a non-empty subset of 0..{E - 1}: {experts}")
        allowed = torch.zeros(E, dtype=torch.bool, device=self.gate.weight.device)
        allowed[list(experts)] = True
        self.allowed, self.n_allowed = allowed, int(allowed.sum())

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate.weight, std=self.init_std)
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cfg = self.cfg
        if self.training and cfg.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1 - cfg.jitter, 1 + cfg.jitter)
            x_TD = x_TD * noise
        # Autocast would cast the fp32 operands back down: scores stay in fp32 only without it.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        top_k = cfg.top_k
        if self.allowed is not None:
            logits_TE = logits_TE.masked_fill(~self.allowed, float("-inf"))
            top_k = min(top_k, self.n_allowed)
        if cfg.score == "softmax":
            probs_TE = logits_TE.softmax(dim=-1)
        else:
            probs_TE = logits_TE.sigmoid()
        select_TE = probs_TE + self.expert_bias if cfg.bias_update_rate > 0 else probs_TE
        if cfg.always_selected:  # FlexOlmo's public expert: in every token's top k
            always = torch.tensor(cfg.always_selected, device=select_TE.device)
            select_TE = select_TE.index_fill(1, always, float("inf"))
        if self.allowed is not None:  # a bias must not lift a forbidden expert into the top k
            select_TE = select_TE.masked_fill(~self.allowed, float("-inf"))
        indices_TK = select_TE.topk(top_k, dim=-1).indices
        weights_TK = probs_TE.gather(1, indices_TK)
        if cfg.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        if self.training:
            counts = torch.bincount(indices_TK.flatten(), minlength=cfg.num_experts)
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        return weights_TK, indices_TK, probs_TE, logits_TE

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_e += rate * sign(mean load - load_e), centred; then reset the counts (DeepSeek-V3).

        Under :meth:`restrict` only the allowed experts' biases move, against their own mean
        load: the others get no tokens, and counting them would pull the mean down.
        """
        load = self.tokens_per_expert
        allowed = torch.ones_like(load, dtype=torch.bool) if self.allowed is None else self.allowed
        step = self.cfg.bias_update_rate * torch.sign(load[allowed].mean() - load)
        step = (step - step[allowed].mean()) * allowed
        self.expert_bias += step
        self.tokens_per_expert.zero_()

    def reset_step_counts(self) -> None:
        self.step_counts_KE = torch.zeros_like(self.step_counts_KE)

    def stats(
        self,
        probs_TE: Tensor,
        logits_TE: Tensor,
        indices_TK: Tensor,
        dropped: Tensor,
        n_seq: int = 1,
    ) -> RouterStats:
        """The layer's :class:`RouterStats`; ``n_seq`` sequences of equal length make up T."""
        granularity = self.cfg.lbl_granularity
        onehot_TKE = F.one_hot(indices_TK, self.cfg.num_experts).float()
        slot_counts_KE = onehot_TKE.sum(dim=0).detach()
        if self.training and self.load_group is not None:
            torch.distributed.all_reduce(slot_counts_KE, group=self.load_group)
        if self.training and granularity == "global_batch":
            if self.step_counts_KE.shape != slot_counts_KE.shape:  # first use, or k changed
                self.step_counts_KE = torch.zeros_like(slot_counts_KE)
            self.step_counts_KE += slot_counts_KE
            slot_counts_KE = self.step_counts_KE.clone()
        seq_probs_SE = seq_counts_SKE = None
        if granularity == "sequence":
            E = self.cfg.num_experts
            seq_probs_SE = probs_TE.view(n_seq, -1, E).mean(dim=1)
            seq_counts_SKE = onehot_TKE.view(n_seq, -1, *onehot_TKE.shape[1:]).sum(dim=1).detach()
        with torch.no_grad():
            p = probs_TE / probs_TE.sum(-1, keepdim=True)
            entropy = -(p * p.clamp(min=1e-20).log()).sum(-1).mean()
        return RouterStats(
            probs_E=probs_TE.mean(dim=0),
            slot_counts_KE=slot_counts_KE,
            lse_sq=torch.logsumexp(logits_TE, dim=-1).square().mean(),
            dropped=dropped.detach(),
            entropy=entropy,
            seq_probs_SE=seq_probs_SE,
            seq_counts_SKE=seq_counts_SKE,
        )
