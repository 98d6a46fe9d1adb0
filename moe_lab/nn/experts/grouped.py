"""The grouped-GEMM backend: the reference MoE's router and weights, experts in ``_grouped_mm``.

Three grouped GEMMs over the token slots sorted by expert (torchtitan's MoE computes the same way),
with no pinned dependency and no host synchronisation: the per-expert counts stay on the device as
the GEMMs' group offsets, so a step never waits for the GPU and ``torch.compile`` traces the layer
whole, which the reference backend's per-expert loop (one ``counts.tolist()`` per layer) cannot.

The weights are the reference layer's ``w1``, ``v1``, ``w2`` (MegaBlocks' GLU layout, see
:mod:`moe_lab.nn.experts.moe`), viewed as ``[E, F, D]``: checkpoints move between all three
backends unchanged. Routing is :class:`~moe_lab.nn.routing.topk.TopKRouter`'s, so decisions,
stats and losses are the reference's too.

Precision: CUDA's grouped GEMM runs in bf16 (``torch._grouped_mm`` is not on autocast's list), so on
CUDA the input and the fp32 master weights are cast to bf16 for the experts, as for MegaBlocks, and
the output is cast back; under autocast the autocast dtype is used. On CPU (torch >= 2.9) it runs
in the input's dtype, fp32 included, which is how the tests check it against the reference.

Capacity mode: every slot is computed and a dropped one is weighted zero (a mask, so neither its
output nor its router weight gets a gradient): the same result as the reference with no host
synchronisation, at the cost of computing the dropped fraction. Expert parallelism runs the
reference's all-to-all path.

Shapes: T = tokens, D = model dim, E = experts, K = experts per token, F = expert hidden width,
S = T * K token slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lab.nn.experts.moe import MoE

__all__ = ["GroupedMoE", "grouped_mm_available", "grouped_swiglu"]


def grouped_mm_available(device: str = "cuda") -> bool:
    """``torch._grouped_mm`` exists and runs on ``device``: any CPU, CUDA from sm80 (Ampere)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device == "cpu":
        return True
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.bfloat16 if device == "cuda" else x.dtype


def grouped_swiglu(x_SD: Tensor, w1: Tensor, v1: Tensor, w2: Tensor, offsets_E: Tensor) -> Tensor:
    """``y [S, D]``: slot s of expert e (``offsets_E[e-1] <= s < offsets_E[e]``) gets
    ``SwiGLU_e(x_SD[s])``; weights ``[E * F, D]``, ``offsets_E`` int32 cumulative counts."""
    E = offsets_E.shape[0]
    w1_EDF, v1_EDF = (w.view(E, -1, w.shape[1]).transpose(-2, -1) for w in (w1, v1))
    w2_EFD = w2.view(E, -1, w2.shape[1])
    gate_SF = torch._grouped_mm(x_SD, w1_EDF, offs=offsets_E)
    up_SF = torch._grouped_mm(x_SD, v1_EDF, offs=offsets_E)
    return torch._grouped_mm(F.silu(gate_SF) * up_SF, w2_EFD, offs=offsets_E)


class GroupedMoE(MoE):
    """:class:`~moe_lab.nn.experts.moe.MoE` whose experts run in ``torch._grouped_mm``."""

    def _experts(
        self, x_TD: Tensor, weights_TK: Tensor, indices_TK: Tensor, kept_TK: Tensor
    ) -> Tensor:
        if self.ep_group is not None:
            return super()._experts(x_TD, weights_TK, indices_TK, kept_TK)
        K = indices_TK.shape[1]
        expert_S = indices_TK.flatten()
        order_S = expert_S.argsort(stable=True)  # slot s = t * K + k, grouped by expert
        token_S = order_S // K
        counts_E = torch.bincount(expert_S, minlength=self.cfg.num_experts)
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        dtype = _compute_dtype(x_TD)
        weight_S = (weights_TK * kept_TK).flatten().index_select(0, order_S).to(dtype)
        w1, v1, w2 = (w.to(dtype) for w in (self.w1, self.v1, self.w2))
        x_SD = x_TD.to(dtype).index_select(0, token_S)
        with torch.autocast(x_TD.device.type, enabled=False):
            y_SD = grouped_swiglu(x_SD, w1, v1, w2, offsets_E) * weight_S[:, None]
        y_TD = torch.zeros(x_TD.shape, dtype=dtype, device=x_TD.device)
        y_TD = y_TD.index_add_(0, token_S, y_SD)
        return y_TD if torch.is_autocast_enabled(x_TD.device.type) else y_TD.to(x_TD.dtype)
