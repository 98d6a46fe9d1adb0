"""The backbone options of the families transformers ships (QK-norm, an independent head width,
attention biases, post-norm, a gated shared expert, dense layers among MoE layers), each checked
against a naive forward pass written from the formulas: no fused kernels, one token at a time
through the experts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_lab.config import ConfigError, ModelConfig, MoEConfig
from moe_lab.nn.experts import SwiGLU
from moe_lab.nn.model import build_model


def _rms(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _linear(module, x):
    return x @ module.weight.T + (0 if module.bias is None else module.bias)


def _rope(z, theta):
    """Rotate-half RoPE of ``z [B, T, H, hd]`` at positions 0..T-1; angles in fp32, as
    transformers computes them."""
    T, hd = z.shape[1], z.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    angle = torch.arange(T).float()[:, None] * inv_freq  # [T, hd/2]
    cos, sin = angle.cos()[:, None].to(z.dtype), angle.sin()[:, None].to(z.dtype)
    z1, z2 = z[..., : hd // 2], z[..., hd // 2 :]
    return torch.cat((z1 * cos - z2 * sin, z2 * cos + z1 * sin), dim=-1)


def _attention(a, cfg, h):
    B, T, _ = h.shape
    H, KV, hd = cfg.n_heads, cfg.kv_heads, cfg.head_size
    q, k, v = _linear(a.wq, h), _linear(a.wk, h), _linear(a.wv, h)
    if cfg.qk_norm == "projection":
        q, k = _rms(q, a.q_norm.weight, cfg.norm_eps), _rms(k, a.k_norm.weight, cfg.norm_eps)
    q, k, v = q.view(B, T, H, hd), k.view(B, T, KV, hd), v.view(B, T, KV, hd)
    if cfg.qk_norm == "head":
        q, k = _rms(q, a.q_norm.weight, cfg.norm_eps), _rms(k, a.k_norm.weight, cfg.norm_eps)
    q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
    k, v = k.repeat_interleave(H // KV, dim=2), v.repeat_interleave(H // KV, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return _linear(a.wo, torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, H * hd))


def _ffn(f, moe, h):
    if isinstance(f, SwiGLU):
        return _linear(f.w2, F.silu(_linear(f.w1, h)) * _linear(f.w3, h))
    E, Fh = moe.num_experts, moe.expert_hidden
    w1, v1, w2 = (w.view(E, Fh, -1) for w in (f.w1, f.v1, f.w2))
    out = torch.zeros_like(h)
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            x = h[b, t]
            probs = (f.router.gate.weight.float() @ x.float()).softmax(-1)  # fp32, by design
            top = probs.topk(moe.top_k)
            weights = top.values / top.values.sum() if moe.renormalize else top.values
            weights = weights.to(x.dtype)
            for w, e in zip(weights, top.indices, strict=True):
                out[b, t] += w * (w2[e].T @ (F.silu(w1[e] @ x) * (v1[e] @ x)))
            if f.shared is not None:
                shared = _linear(
                    f.shared.w2, F.silu(_linear(f.shared.w1, x)) * _linear(f.shared.w3, x)
                )
                if f.shared_gate is not None:
                    shared = torch.sigmoid(f.shared_gate.weight @ x) * shared
                out[b, t] += shared
    return out


def naive_logits(model, ids):
    cfg, eps = model.cfg, model.cfg.norm_eps
    x = model.tok_embeddings.weight[ids]
    for layer in model.layers:
        if cfg.norm_position == "post":
            x = x + _rms(_attention(layer.attention, cfg, x), layer.attention_norm.weight, eps)
            x = x + _rms(_ffn(layer.feed_forward, cfg.moe, x), layer.ffn_norm.weight, eps)
        else:
            x = x + _attention(layer.attention, cfg, _rms(x, layer.attention_norm.weight, eps))
            x = x + _ffn(layer.feed_forward, cfg.moe, _rms(x, layer.ffn_norm.weight, eps))
    return _rms(x, model.norm.weight, eps) @ model.head_weight.T


def _random_model(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg, dtype=torch.float64)
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so each one matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


_MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=24)
OPTIONS = {
    "qk-norm over the projection (OLMoE)": dict(qk_norm="projection"),
    "qk-norm per head, head_dim 24 (Qwen3)": dict(qk_norm="head", head_dim=24),
    "head_dim 12 < dim / n_heads": dict(head_dim=12),
    "q, k, v biases (Qwen2)": dict(attention_bias="qkv"),
    "all attention biases": dict(attention_bias="all"),
    "post-norm (OLMo 2, FlexOlmo)": dict(norm_position="post", qk_norm="projection"),
    "MoE, top-k not renormalised": dict(moe=_MOE),
    "MoE, gated shared expert (Qwen2-MoE)": dict(
        moe=MoEConfig(
            num_experts=4,
            top_k=2,
            expert_hidden=24,
            renormalize=False,
            shared_expert_hidden=40,
            shared_expert_gate=True,
        )
    ),  # fmt: skip
    "MoE every 2nd layer, layer 3 dense": dict(
        n_layers=4,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=24, every=2, dense_layers=[3]),
    ),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_option_matches_the_naive_forward(options):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_hidden=48)
    cfg = ModelConfig(**{**base, **options})
    model = _random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, reference = model(ids).logits, naive_logits(model, ids)
    # fp64 throughout, except the router's scores, which are fp32 by design (a different
    # summation order there moves the logits by ~1e-9)
    atol = 1e-10 if cfg.moe is None else 1e-7
    torch.testing.assert_close(ours, reference, rtol=0, atol=atol)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_dense_layers_choose_the_ffn_and_count_parameters():
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=24, every=2, dense_layers=[3])
    cfg = ModelConfig(n_layers=6, moe=moe)
    model = build_model(cfg, device="meta")
    kinds = [type(layer.feed_forward).__name__ for layer in model.layers]
    assert kinds == ["SwiGLU", "MoE", "SwiGLU", "SwiGLU", "SwiGLU", "MoE"]


def test_cached_generation_with_the_options_matches_the_full_forward():
    cfg = ModelConfig(qk_norm="head", head_dim=24, attention_bias="qkv", norm_position="post")
    model = _random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    from moe_lab.nn.model import KVCache

    cache = KVCache(cfg, 1, 9, dtype=torch.float64)
    with torch.no_grad():
        full = model(ids).logits
        step = torch.cat([model(ids[:, :5], cache=cache).logits]
                         + [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 9)],
                         dim=1)  # fmt: skip
    torch.testing.assert_close(step, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(qk_norm="rms"), r"model.qk_norm must be one of none, projection, head"),
        (dict(attention_bias="yes"), r"model.attention_bias must be one of"),
        (dict(norm_position="sandwich"), r"model.norm_position must be one of pre, post"),
        (dict(head_dim=7), r"head_dim must be even"),
        (dict(dim=60, n_heads=8), r"divisible by model.n_heads \(8\), or set model.head_dim"),
        (dict(moe=MoEConfig(dense_layers=[0, 1])), r"leave no MoE layer"),
        (dict(moe=MoEConfig(dense_layers=[5])), r"dense_layers \[5\] names a layer >= "),
        (dict(moe=MoEConfig(shared_expert_gate=True)), r"shared_expert_gate needs a shared"),
        (dict(moe=MoEConfig(top_k=1, always_selected=[0, 1])), r"at most top_k \(1\) distinct"),
        (dict(moe=MoEConfig(always_selected=[8])), r"always_selected must hold .* in 0..7"),
    ],
)
def test_invalid_options_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**overrides).validate()


def test_always_selected_experts_are_in_every_tokens_top_k_with_their_probability():
    from moe_lab.nn.routing.topk import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(16, MoEConfig(num_experts=4, top_k=2, always_selected=[3]))
    router.reset_parameters()
    with torch.no_grad():
        router.gate.weight[3] = -10 * router.gate.weight[3].sign()  # expert 3 scores low
    x = torch.randn(64, 16)
    weights, indices, probs, _ = router(x)
    assert (indices == 3).any(dim=1).all()
    others = probs.clone()
    others[:, 3] = -1
    best_other = others.argmax(1)
    assert all(set(row.tolist()) == {3, int(o)} for row, o in zip(indices, best_other, strict=True))
    assert (probs.topk(2).indices != 3).all(1).any()  # without the rule, 3 would lose somewhere
    picked = probs.gather(1, indices)
    torch.testing.assert_close(weights, picked / picked.sum(1, keepdim=True))
    router.restrict([0, 1])  # a restriction still wins: 3 is never chosen when forbidden
    assert not (router(x)[1] == 3).any()
