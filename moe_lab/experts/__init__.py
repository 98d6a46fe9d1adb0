"""What computes: the FFN of each transformer layer, dense SwiGLU or a token-routed MoE."""

from __future__ import annotations

import torch
from torch import nn

from moe_lab.config import ConfigError, ModelConfig
from moe_lab.experts.dense import SwiGLU
from moe_lab.experts.moe import MoE

__all__ = ["MoE", "SwiGLU", "build_ffn", "resolve_backend"]


def resolve_backend(requested: str) -> str:
    """``auto`` -> ``reference`` until the MegaBlocks adapter lands; ``megablocks`` needs CUDA."""
    if requested == "megablocks":
        if not torch.cuda.is_available():
            raise ConfigError(
                "model.moe.backend is 'megablocks', which needs CUDA and this machine has none; "
                "use model.moe.backend=reference (the same weights run on CPU)"
            )
        raise ConfigError(
            "model.moe.backend=megablocks is not available yet: use reference (GPU and CPU)"
        )
    return "reference"


def build_ffn(cfg: ModelConfig, layer_id: int) -> nn.Module:
    """The FFN of layer ``layer_id``: the one place where dense and sparse models differ.

    Every module returned maps ``x [..., dim]`` to ``(y [..., dim], RouterStats | None)``.
    """
    moe = cfg.moe
    if moe is None or not moe.is_moe_layer(layer_id):
        return SwiGLU(cfg.dim, cfg.ffn_hidden, cfg.n_layers, cfg.init_std)
    resolve_backend(moe.backend)
    return MoE(cfg.dim, moe, cfg.n_layers, cfg.init_std)
