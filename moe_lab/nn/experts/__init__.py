"""What computes: the FFN of each transformer layer, dense SwiGLU or a token-routed MoE."""

from __future__ import annotations

import torch
from torch import nn

from moe_lab.config import ConfigError, ModelConfig, MoEConfig
from moe_lab.nn.experts.dense import SwiGLU
from moe_lab.nn.experts.megablocks import MegaBlocksMoE, import_megablocks, megablocks_available
from moe_lab.nn.experts.moe import MoE

__all__ = ["MegaBlocksMoE", "MoE", "SwiGLU", "build_ffn", "resolve_backend"]


def resolve_backend(cfg: MoEConfig) -> str:
    """The backend that runs: ``megablocks`` checked (CUDA, the package, dropless), or
    ``reference``; ``auto`` picks MegaBlocks only where it would pass those checks."""
    if cfg.backend == "auto":
        dropless = cfg.capacity_factor is None
        return "megablocks" if dropless and megablocks_available() else "reference"
    if cfg.backend == "megablocks":
        if not torch.cuda.is_available():
            raise ConfigError(
                "model.moe.backend is 'megablocks', which needs CUDA and this machine has none; "
                "use model.moe.backend=reference (the same weights run on CPU)"
            )
        import_megablocks()
    return cfg.backend


def build_ffn(cfg: ModelConfig, layer_id: int) -> nn.Module:
    """The FFN of layer ``layer_id``: the one place where dense and sparse models differ.

    Every module returned maps ``x [..., dim]`` to ``(y [..., dim], RouterStats | None)``.
    """
    moe = cfg.moe
    if moe is None or not moe.is_moe_layer(layer_id):
        return SwiGLU(cfg.dim, cfg.ffn_hidden, cfg.n_layers, cfg.init_std)
    layer = MegaBlocksMoE if resolve_backend(moe) == "megablocks" else MoE
    return layer(cfg.dim, moe, cfg.n_layers, cfg.init_std)
