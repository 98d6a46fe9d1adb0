"""k dense experts of one shape run as one batch: row i of the input, the KV cache and the
logits is expert i's, and every weight is the k experts' weights stacked.

Why: one generated token makes each expert multiply a single row by every weight matrix. On the 2
CPU cores we develop on, k experts doing that one after the other ran slower than k times one (their
weights together outgrow the cache), while one batched GEMM over k stacked ``[in, out]`` matrices
ran 3.5x faster than k ``F.linear`` calls at k=2 for a 256 x 8192 head. A generating top-2
ensemble went from 0.48 to 1.26 times one expert's speed (``bench/ensemble.py``).

The stacked model is a :class:`~moe_lab.nn.model.Transformer` whose weight-holding modules are
replaced: positions, masks, the KV cache, RoPE, attention and the residual structure are the
model's own code, so every option of :class:`~moe_lab.config.ModelConfig` a dense model has
(biases, q/k norms, post-norm, tied embeddings) runs here as it does there. Inference only, and
the stacking copies the k experts' weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lab.nn.model import KVCache, Transformer, build_model
from moe_lab.nn.norm import RMSNorm

__all__ = ["StackedExperts", "stackable"]


def stackable(experts: Sequence[Transformer]) -> bool:
    """Whether :class:`StackedExperts` takes these experts: dense, one configuration."""
    cfg = experts[0].cfg
    return cfg.moe is None and all(e.cfg == cfg for e in experts)


class StackedExperts:
    """``last_logits(ids [k, T], cache) -> [k, V]``: each expert's next-token logits after its row.

    Args:
        experts: k dense experts with one :class:`~moe_lab.config.ModelConfig`.
    """

    def __init__(self, experts: Sequence[Transformer]) -> None:
        if not experts or not stackable(experts):
            kinds = sorted({"MoE" if e.cfg.moe is not None else "dense" for e in experts})
            raise ValueError(
                f"only dense experts of one configuration can be stacked, got {len(experts)} "
                f"expert(s): {', '.join(kinds) or 'none'}, "
                f"{len({repr(e.cfg) for e in experts})} configuration(s)"
            )
        self.cfg = cfg = experts[0].cfg
        model = build_model(cfg, device="meta")
        model.tok_embeddings = _Embedding([e.tok_embeddings.weight for e in experts])
        model.norm = _norm([e.norm for e in experts])
        model.output = None
        for i, block in enumerate(model.layers):
            layers = [e.layers[i] for e in experts]
            block.attention_norm = _norm([layer.attention_norm for layer in layers])
            block.ffn_norm = _norm([layer.ffn_norm for layer in layers])
            block.attention = _Attention([layer.attention for layer in layers])
            block.feed_forward = _SwiGLU([layer.feed_forward for layer in layers])
        self.model = model
        self.head = _matrices([e.head_weight for e in experts])  # [k, D, V]
        self.k = len(experts)

    @property
    def device(self) -> torch.device:
        return self.head.device

    def new_cache(self, max_len: int) -> KVCache:
        """An empty KV cache for the k rows."""
        return KVCache(self.cfg, self.k, max_len, self.head.device, self.head.dtype)

    @torch.no_grad()
    def last_logits(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """``[k, V]`` logits after the last of ``ids [k, T]``, row i through expert i."""
        if ids.ndim != 2 or ids.shape[0] != self.k:
            raise ValueError(
                f"need ids of shape [{self.k}, T], one row per expert, got {tuple(ids.shape)}"
            )
        h, _, _ = self.model.hidden_states(ids, cache=cache)
        return torch.bmm(h[:, -1:], self.head)[:, 0]


def _matrices(weights: list[Tensor]) -> Tensor:
    """``[k, in, out]`` from k ``nn.Linear`` weights ``[out, in]``: each row's GEMM reads its
    matrix contiguously (over the transposed view, a 256 x 8192 head ran 1.6x slower at k=2)."""
    return torch.stack([w.t() for w in weights])


def _rows(vectors: list[Tensor | None], ndim: int) -> Tensor | None:
    """k vectors stacked to broadcast over ``[k, ..., n]`` with ``ndim`` dims; None if absent."""
    if vectors[0] is None:
        return None
    return torch.stack(vectors).view(len(vectors), *[1] * (ndim - 2), -1)


def _norm(norms: list[RMSNorm | None], ndim: int = 3) -> RMSNorm | None:
    """An RMSNorm whose weight is the k norms' weights, one per row: ``weight * x_hat``
    broadcasts it over ``[k, ..., n]``."""
    if norms[0] is None:
        return None
    stacked = RMSNorm(norms[0].weight.shape[0], norms[0].eps)
    stacked.weight = nn.Parameter(_rows([n.weight for n in norms], ndim), requires_grad=False)
    return stacked


class _Embedding(nn.Module):
    def __init__(self, weights: list[Tensor]) -> None:
        super().__init__()
        self.weight = torch.stack(weights)  # [k, V, D]

    def forward(self, ids: Tensor) -> Tensor:
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        return self.weight[rows, ids]


class _Attention(nn.Module):
    """The experts' q, k, v and output projections as batched GEMMs around the model's own
    :meth:`~moe_lab.nn.model.Attention.attend`."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.attention = layers[0]  # only its attend() and head shapes are used
        self.w_qkv = torch.stack(
            [torch.cat((a.wq.weight, a.wk.weight, a.wv.weight)).t() for a in layers]
        )
        biases = [
            None if a.wq.bias is None else torch.cat((a.wq.bias, a.wk.bias, a.wv.bias))
            for a in layers
        ]
        self.b_qkv = _rows(biases, 3)
        self.wo = _matrices([a.wo.weight for a in layers])
        self.b_o = _rows([a.wo.bias for a in layers], 3)
        ndim = 4 if layers[0].per_head_norm else 3
        self.norms = (
            _norm([a.q_norm for a in layers], ndim),
            _norm([a.k_norm for a in layers], ndim),
        )

    def forward(self, x, cos, sin, mask, cache) -> Tensor:
        qkv = _bmm(x, self.w_qkv, self.b_qkv)
        heads = self.attention.attend(qkv, cos, sin, mask, cache, self.norms)
        return _bmm(heads, self.wo, self.b_o)


class _SwiGLU(nn.Module):
    def __init__(self, ffns: list[nn.Module]) -> None:
        super().__init__()
        self.w13 = torch.stack([torch.cat((f.w1.weight, f.w3.weight)).t() for f in ffns])
        self.w2 = _matrices([f.w2.weight for f in ffns])

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        gate, up = torch.bmm(x, self.w13).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.w2), None


def _bmm(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.bmm(x, w) if b is None else torch.baddbmm(b, x, w)
