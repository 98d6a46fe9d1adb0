"""Sparse upcycling (Komatsuzaki et al. 2023): an MoE initialised from a dense checkpoint.

Every expert starts as a copy of the layer's dense FFN (optionally perturbed), the router is small
and random, everything else is copied. With renormalised top-k weights, no capacity limit, no
shared expert and no noise, the experts' mixture equals the dense FFN exactly, so the upcycled
model computes what the dense one did at step 0 (tested); other settings start close to it.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moe_lab.config import ConfigError, MoEConfig
from moe_lab.nn.model import Transformer, build_model

__all__ = ["upcycle"]


@torch.no_grad()
def upcycle(dense: Transformer, moe: MoEConfig, noise: float = 0.0, seed: int = 0) -> Transformer:
    """Build an MoE model from ``dense`` with ``moe`` in place of its FFNs.

    Args:
        dense: a dense moe_lab model.
        moe: the MoE layers to create; ``expert_hidden`` must equal the dense ``ffn_hidden``.
        noise: relative std of multiplicative noise on each expert copy (0 = exact copies; the
            OLMoE sparsify script offers 50%), which breaks the symmetry between experts.
        seed: seeds the router init and the noise.

    Returns:
        A model on ``dense``'s device and dtype; the router is ``N(0, init_std)``.
    """
    if dense.cfg.moe is not None:
        raise ConfigError("upcycle needs a dense model; this one already has model.moe set")
    if moe.expert_hidden != dense.cfg.ffn_hidden:
        raise ConfigError(
            f"model.moe.expert_hidden ({moe.expert_hidden}) must equal model.ffn_hidden "
            f"({dense.cfg.ffn_hidden}) to copy the dense FFN into every expert"
        )
    param = next(dense.parameters())
    generator = torch.Generator(device=param.device).manual_seed(seed)
    with torch.random.fork_rng(devices=[param.device] if param.is_cuda else []):
        torch.manual_seed(seed)
        model = build_model(replace(dense.cfg, moe=moe), device=param.device, dtype=param.dtype)
    state = model.state_dict()
    for name, value in dense.state_dict().items():
        if name in state and state[name].shape == value.shape:
            state[name].copy_(value)
    for i, layer in enumerate(model.layers):
        if not moe.is_moe_layer(i):
            continue
        ffn, src = layer.feed_forward, dense.layers[i].feed_forward
        E = moe.num_experts
        for ours, theirs in (
            (ffn.w1, src.w1.weight),
            (ffn.v1, src.w3.weight),
            (ffn.w2, src.w2.weight.t()),
        ):
            copies = theirs.repeat(E, 1)  # [E * F, D]: expert e in rows [e F, (e + 1) F)
            if noise > 0:
                copies = copies * (
                    1
                    + noise
                    * torch.randn(
                        copies.shape, generator=generator, device=copies.device, dtype=copies.dtype
                    )
                )
            ours.copy_(copies)
    return model
