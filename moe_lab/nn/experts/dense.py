"""The dense SwiGLU feed-forward network of Llama: ``w2(silu(w1 x) * w3 x)``."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SwiGLU"]


class SwiGLU(nn.Module):
    """Llama's gated FFN (Shazeer 2020): ``w1`` gate, ``w3`` up and ``w2`` down projection.

    Returns ``(y, None)``: every FFN built by :func:`moe_lab.nn.experts.build_ffn` returns its
    output and its routing statistics (None when there is no router), so the block never branches on
    the kind of FFN.
    """

    def __init__(self, dim: int, hidden: int, n_layers: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.init_std = init_std
        self.n_layers = n_layers

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1.weight, std=self.init_std)
        nn.init.normal_(self.w3.weight, std=self.init_std)
        # Residual output projection scaled by 1/sqrt(2L) (GPT-2, Radford et al. 2019).
        nn.init.normal_(self.w2.weight, std=self.init_std / math.sqrt(2 * self.n_layers))

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), None
