"""The one Llama backbone: RMSNorm, RoPE, grouped-query attention, and an FFN from ``build_ffn``.

Parameter names follow Meta's Llama and torchtitan (``tok_embeddings``, ``layers.{i}.attention.wq``,
``feed_forward.w1``, ``norm``, ``output``) so checkpoint layouts map one to one. RoPE uses the
rotate-half layout of transformers, so Hugging Face weights load without permuting ``wq``/``wk``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lab.config import ModelConfig
from moe_lab.nn.causal_attention import causal_attention
from moe_lab.nn.experts import build_ffn
from moe_lab.nn.losses import IGNORE_INDEX, fused_linear_cross_entropy
from moe_lab.nn.norm import RMSNorm
from moe_lab.nn.rope import apply_rope, rope_frequencies
from moe_lab.nn.routing import RouterStats, moe_aux_loss

__all__ = ["KVCache", "ModelOutput", "Transformer", "build_model"]


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]
    aux_loss: Tensor  # [] weighted balancing + z-losses of the MoE layers; exactly 0 for dense
    routing: list[RouterStats] = field(default_factory=list)  # one entry per MoE layer


def positions_in_documents(doc_ids: Tensor) -> Tensor:
    """Position of each token within its document: ``[B, T]`` ids -> ``[B, T]`` positions.

    Restarting RoPE positions at every document boundary makes a packed document compute exactly
    what it would compute alone (Llama 3 document masking plus per-document positions).
    """
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start


class KVCache:
    """Keys and values of past positions for every layer, preallocated up to ``max_len``."""

    def __init__(
        self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None
    ) -> None:
        shape = (batch_size, cfg.kv_heads, max_len, cfg.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled so far; advanced by the model after each forward

    def update(self, layer_id: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v [B, Hkv, T, hd]`` after the past; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer_id][:, :, self.length : end] = k
        self.v[layer_id][:, :, self.length : end] = v
        return self.k[layer_id][:, :, :end], self.v[layer_id][:, :, :end]

    def row(self, i: int) -> KVCache:
        """Sequence ``i`` alone, as a one-sequence cache over the same memory (a write through
        either shows in both); its length starts as this cache's."""
        view = copy.copy(self)
        view.k, view.v = [k[i : i + 1] for k in self.k], [v[i : i + 1] for v in self.v]
        return view


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): causal through
    :func:`~moe_lab.nn.causal_attention.causal_attention`, with a document mask or after a cached
    past through ``scaled_dot_product_attention`` and that mask.

    Options of the families transformers ships: biases on the projections (Qwen2: ``qkv``), and
    an RMSNorm of queries and keys before RoPE, over the whole projection (OLMo 2, OLMoE) or each
    head alone (Qwen3), see :class:`~moe_lab.config.ModelConfig`.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        q_dim, kv_dim = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
        qkv_bias = cfg.attention_bias != "none"
        self.wq = nn.Linear(cfg.dim, q_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.dim, kv_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.dim, kv_dim, bias=qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.dim, bias=cfg.attention_bias == "all")
        self.q_norm = self.k_norm = None
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(cfg.head_size if per_head else q_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_size if per_head else kv_dim, cfg.norm_eps)
        self.per_head_norm = cfg.qk_norm == "head"
        self.init_std, self.n_layers = cfg.init_std, cfg.n_layers

    def reset_parameters(self) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=self.init_std)
        nn.init.normal_(self.wo.weight, std=self.init_std / math.sqrt(2 * self.n_layers))
        for lin in (self.wq, self.wk, self.wv, self.wo):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        # One GEMM for q, k and v over the concatenated weights (a 1.5 MB copy at d=512): ~10%
        # faster than three on CPU, while the state dict keeps Llama's separate wq, wk, wv.
        w_qkv = torch.cat((self.wq.weight, self.wk.weight, self.wv.weight))
        b_qkv = None
        if self.wq.bias is not None:
            b_qkv = torch.cat((self.wq.bias, self.wk.bias, self.wv.bias))
        return self.wo(self.attend(F.linear(x, w_qkv, b_qkv), cos, sin, mask, cache))

    def attend(
        self,
        qkv: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        norms: tuple[nn.Module, nn.Module] | None = None,
    ) -> Tensor:
        """Attention of the projected ``qkv [B, T, (H + 2 Hkv) hd]``: ``[B, T, H hd]``, before
        ``wo``. ``norms`` stands in for ``(q_norm, k_norm)``: the stacked experts of
        :mod:`moe_lab.ensembles.stacked` pass theirs, one weight per row of the batch."""
        q_norm, k_norm = norms if norms is not None else (self.q_norm, self.k_norm)
        B, T, _ = qkv.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split((q_dim, kv_dim, kv_dim), dim=-1)
        if q_norm is not None and not self.per_head_norm:
            q, k = q_norm(q), k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.per_head_norm:
            q, k = q_norm(q), k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, hd], [B, Hkv, T, hd]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # [B, Hkv, past + T, hd]
        if mask is None:  # no document mask, no cached past: plain causal, as many keys as queries
            y = causal_attention(q, k, v)
        else:  # enable_gqa: each group of query heads reads its kv head without copying it
            gqa = self.n_kv_heads != self.n_heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(B, T, -1)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = build_ffn(cfg, layer_id)
        self.post_norm = cfg.norm_position == "post"

    def reset_parameters(self) -> None:
        self.attention_norm.reset_parameters()
        self.attention.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.feed_forward.reset_parameters()

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> tuple[Tensor, RouterStats | None]:
        if self.post_norm:  # OLMo 2: the sublayers' outputs are normalised, the stream is not
            x = x + self.attention_norm(self.attention(x, cos, sin, mask, cache))
            y, routing = self.feed_forward(x)
            return x + self.ffn_norm(y), routing
        #  x ─┬─ norm ─ attention ─(+)─┬─ norm ─ ffn ─(+)─> out
        #     └────────────────────────┘└───────────────┘
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        y, routing = self.feed_forward(self.ffn_norm(x))
        return x + y, routing


class Transformer(nn.Module):
    """Decoder-only Llama: ``input_ids [B, T] -> ModelOutput(logits [B, T, V], aux_loss [])``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # _weight: skip nn.Embedding's own init. build_model() constructs on the meta device,
        # where normal_ runs a Python reference that imports torch._dynamo: 1.2 s of every
        # `moe-lab eval` or `generate`. reset_parameters() initialises every weight anyway.
        self.tok_embeddings = nn.Embedding(
            cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim)
        )
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # With tied embeddings there is no `output` module: the head reads tok_embeddings.weight.
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # RoPE frequencies stay fp32 and out of the state dict: a cache, not a buffer .to() casts.
        self._inv_freq: Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re-)initialise every parameter: normal(0, init_std), residual projections scaled."""
        nn.init.normal_(self.tok_embeddings.weight, std=self.cfg.init_std)
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=self.cfg.init_std)
        for layer in self.layers:
            layer.reset_parameters()
        self.norm.reset_parameters()

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            cfg = self.cfg
            inv_freq = rope_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling)
            self._inv_freq = inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq  # [B, T, hd/2], fp32 as transformers
        return freqs.cos().to(dtype)[:, None], freqs.sin().to(dtype)[:, None]  # [B, 1, T, hd/2]

    @property
    def head_weight(self) -> Tensor:
        """``[V, D]`` output projection: the embedding matrix when tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(
        self, input_ids: Tensor, doc_ids: Tensor | None = None, cache: KVCache | None = None
    ) -> ModelOutput:
        """Next-token logits.

        Args:
            input_ids: ``[B, T]`` token ids.
            doc_ids: optional ``[B, T]`` document ids of a packed sequence; attention never crosses
                a document boundary and RoPE positions restart at each document.
            cache: optional :class:`KVCache`; the tokens continue the cached prefix.
        """
        h, aux_loss, routing = self.hidden_states(input_ids, doc_ids, cache)
        return ModelOutput(F.linear(h, self.head_weight), aux_loss, routing)

    def loss(
        self, input_ids: Tensor, targets: Tensor, doc_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor, list[RouterStats]]:
        """``(mean next-token cross-entropy, aux_loss, routing)`` without materialising logits.

        ``targets`` is ``[B, T]`` with -100 where no loss is taken. Same value and gradients as
        cross-entropy over ``forward(...).logits``; see :mod:`moe_lab.nn.losses`.
        """
        h, aux_loss, routing = self.hidden_states(input_ids, doc_ids)
        _check_ids("targets", targets, self.cfg.vocab_size, input_ids.shape)
        return fused_linear_cross_entropy(h, self.head_weight, targets), aux_loss, routing

    def hidden_states(
        self, input_ids: Tensor, doc_ids: Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor, list[RouterStats]]:
        """Final normalised hidden states ``[B, T, D]``, the auxiliary loss, the routing stats."""
        _check_ids("input_ids", input_ids, self.cfg.vocab_size)
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds model.max_seq_len ({self.cfg.max_seq_len})"
            )
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (document masking) cannot be combined with a KV cache")
        if cache is not None and (past + T > cache.max_len or B != cache.k[0].shape[0]):
            raise ValueError(
                f"a KV cache for {cache.k[0].shape[0]} sequences of {cache.max_len} tokens cannot "
                f"take {B} sequences reaching {past + T} tokens"
            )
        mask = None
        if doc_ids is not None:
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids {(B, T)}")
            positions = positions_in_documents(doc_ids)
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]  # [B, 1, T, T]
        else:
            positions = torch.arange(past, past + T, device=input_ids.device)[None]
            if past > 0:  # new queries see every cached key and the causal part of the new ones
                mask = torch.ones(T, past + T, dtype=torch.bool, device=input_ids.device).tril(past)

        h = self.tok_embeddings(input_ids)
        cos, sin = self._rope(positions, h.dtype)
        routing = []
        for layer in self.layers:
            h, stats = layer(h, cos, sin, mask, cache)
            if stats is not None:
                routing.append(stats)
        if cache is not None:
            cache.length += T
        if routing:
            aux_loss = moe_aux_loss(routing, self.cfg.moe)
        else:
            aux_loss = torch.zeros((), device=h.device, dtype=torch.float32)
        return self.norm(h), aux_loss, routing


def _check_ids(name: str, ids: Tensor, vocab: int, shape: torch.Size | None = None) -> None:
    """Refuse ids the embedding or the loss would misread: torch reports an id outside the
    vocabulary as a bare IndexError (or a CUDA assert), and a negative target other than -100 is
    silently scored as another token. One reduction and one host sync per call; skipped while
    ``torch.compile`` traces, where a data-dependent branch would split the graph."""
    if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be a [batch, tokens] integer tensor, got "
                         f"{ids.dtype} of shape {tuple(ids.shape)}")  # fmt: skip
    if shape is not None and ids.shape != shape:
        raise ValueError(f"{name} shape {tuple(ids.shape)} != input_ids {tuple(shape)}")
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    targets = name == "targets"
    outside = (ids < 0) | (ids >= vocab)
    if targets:
        outside &= ids != IGNORE_INDEX
    if outside.any():
        allowed = f"[0, {vocab})" + (f" or {IGNORE_INDEX} (no loss)" if targets else "")
        raise ValueError(f"{name} holds {ids[outside][0].item()}, outside {allowed}")


def build_model(
    cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Transformer:
    """Build and initialise a model; ``device="meta"`` builds shapes only, allocating nothing.

    Args:
        cfg: the model shape; validated first.
        device: where to allocate parameters (default: the current default device).
        dtype: parameter dtype (default: the current default dtype, fp32).
    """
    cfg.validate()
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device(
        "meta"
    ):  # shapes first; memory is allocated once, below, and initialised once
        model = Transformer(cfg)
    if dtype is not None:
        model.to(dtype=dtype)
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    model.reset_parameters()
    return model
