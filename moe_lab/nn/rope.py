"""Rotary position embeddings (Su et al. 2021) in transformers' rotate-half layout, with Llama 3.1
frequency scaling and a hand-written backward."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moe_lab.config import RopeScalingConfig

__all__ = ["apply_rope", "rope_frequencies"]


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig | None) -> Tensor:
    """Inverse RoPE frequencies ``[head_dim // 2]`` in fp32, with Llama 3.1 scaling if given."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    # Long wavelengths are stretched by `factor`; short ones kept; the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, hd]`` by position; ``cos``/``sin`` are ``[B, 1, T, hd // 2]``."""
    if torch.compiler.is_compiling():  # inductor fuses the formula into one kernel
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return _Rope.apply(x, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``(x1 cos - x2 sin, x2 cos + x1 sin)`` over the halves of the last dim, written in place
    into one output: four kernels and no temporaries instead of seven kernels and six."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2 = x.chunk(2, dim=-1)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    return out


class _Rope(torch.autograd.Function):
    """RoPE with a hand-written backward: a rotation's gradient is the rotation by ``-angle``.

    Autograd through the formula runs ~3x as many kernels; this halves RoPE's cost on CPU.
    """

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None
