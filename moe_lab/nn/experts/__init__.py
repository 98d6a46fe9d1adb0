"""What computes: the FFN of each transformer layer, dense SwiGLU or a token-routed MoE."""

from __future__ import annotations

import torch
from torch import nn

from moe_lab.config import ConfigError, ModelConfig, MoEConfig
from moe_lab.nn.experts.dense import SwiGLU
from moe_lab.nn.experts.grouped import GroupedMoE, grouped_mm_available
from moe_lab.nn.experts.megablocks import MegaBlocksMoE, import_megablocks, megablocks_available
from moe_lab.nn.experts.moe import MoE

__all__ = ["GroupedMoE", "MegaBlocksMoE", "MoE", "SwiGLU", "build_ffn", "resolve_backend"]


def resolve_backend(cfg: MoEConfig) -> str:
    """The backend that runs, its requirements checked. ``auto``: on a CUDA machine ``grouped``
    (``torch._grouped_mm``, sm80+), else ``megablocks`` where it imports and the layer is
    dropless, else ``reference``; on CPU ``reference``, whose fused expert Function is the
    fastest there (``bench/moe_layer.py``)."""
    if cfg.backend == "auto":
        if grouped_mm_available("cuda"):
            return "grouped"
        dropless = cfg.capacity_factor is None
        return "megablocks" if dropless and megablocks_available() else "reference"
    if cfg.backend == "grouped" and not grouped_mm_available("cpu"):
        raise ConfigError(
            f"model.moe.backend=grouped needs torch._grouped_mm (torch >= 2.9), which torch "
            f"{torch.__version__} lacks; use model.moe.backend=reference"
        )
    if cfg.backend == "megablocks":
        if not torch.cuda.is_available():
            raise ConfigError(
                "model.moe.backend is 'megablocks', which needs CUDA and this machine has none; "
                "use model.moe.backend=reference (the same weights run on CPU)"
            )
        import_megablocks()
    return cfg.backend


_LAYERS = {"reference": MoE, "grouped": GroupedMoE, "megablocks": MegaBlocksMoE}


def build_ffn(cfg: ModelConfig, layer_id: int) -> nn.Module:
    """The FFN of layer ``layer_id``: the one place where dense and sparse models differ.

    Every module returned maps ``x [..., dim]`` to ``(y [..., dim], RouterStats | None)``.
    """
    moe = cfg.moe
    if moe is None or not moe.is_moe_layer(layer_id):
        return SwiGLU(cfg.dim, cfg.ffn_hidden, cfg.n_layers, cfg.init_std)
    layer = _LAYERS[resolve_backend(moe)]
    return layer(cfg.dim, moe, cfg.n_layers, cfg.init_std)
