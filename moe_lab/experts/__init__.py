"""What computes: the FFN of each transformer layer (dense SwiGLU; MoE layers plug in here)."""

from __future__ import annotations

from torch import nn

from moe_lab.config import ModelConfig
from moe_lab.experts.dense import SwiGLU

__all__ = ["SwiGLU", "build_ffn"]


def build_ffn(cfg: ModelConfig, layer_id: int) -> nn.Module:
    """The FFN of layer ``layer_id``: the one place where dense and sparse models differ.

    Every module returned maps ``x [..., dim]`` to ``(y [..., dim], aux_loss [])``.
    """
    del layer_id  # every layer is dense until token-routed MoE layers are configured
    return SwiGLU(cfg.dim, cfg.ffn_hidden, cfg.n_layers, cfg.init_std)
