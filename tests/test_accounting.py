import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moe_lab import ModelConfig, build_model
from moe_lab.accounting import estimate
from moe_lab.config import load_model_preset

TINY = {
    "mha": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=300, ffn_hidden=176),
    "gqa": ModelConfig(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=500, ffn_hidden=256),
    "tied": ModelConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        vocab_size=300,
        ffn_hidden=128,
        tie_embeddings=True,
    ),
}

# Published parameter counts: LLaMA paper (Touvron et al. 2023, Table 2), Llama 2 and Llama 3 model
# cards (6.74B, 13.0B, 69.0B, 8.03B, 70.6B) and the Llama 3 herd paper (405B).
PUBLISHED = {
    "llama1-7b": 6.7e9,
    "llama1-13b": 13.0e9,
    "llama1-33b": 32.5e9,
    "llama1-65b": 65.2e9,
    "llama2-7b": 6.74e9,
    "llama2-13b": 13.0e9,
    "llama2-70b": 69.0e9,
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.6e9,
    "llama3-405b": 405e9,
}


@pytest.mark.parametrize("name", TINY)
def test_params_equal_the_built_model_exactly(name):
    cfg = TINY[name]
    model = build_model(cfg)
    est = estimate(cfg, 32)
    assert est.total_params == sum(p.numel() for p in model.parameters())
    assert est.active_params == est.total_params  # dense: every parameter is active


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("seq_len", [16, 128])
def test_flops_match_torch_flop_counter(name, seq_len, monkeypatch):
    """The estimate counts attention over the full square (PaLM), as SDPA's math backend computes
    it. So that backend is forced (FlopCounterMode has no formula for the CPU flash kernel in
    torch 2.13), and the block-triangular CPU attention, which skips masked blocks, is off."""
    monkeypatch.setattr("moe_lab.nn.causal_attention.MAX_LEN", 0)
    cfg = TINY[name]
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq_len))
    est = estimate(cfg, seq_len)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        logits = model(tokens).logits
    assert forward.get_total_flops() / tokens.numel() == pytest.approx(
        est.forward_flops_per_token, rel=0.02
    )
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as train:
        model(tokens).logits.float().logsumexp(-1).sum().backward()
    assert train.get_total_flops() / tokens.numel() == pytest.approx(
        est.train_flops_per_token, rel=0.02
    )
    assert logits.shape[-1] == cfg.vocab_size


@pytest.mark.parametrize("name", PUBLISHED)
def test_presets_reproduce_published_parameter_counts(name):
    cfg = load_model_preset(name)
    assert estimate(cfg).total_params == pytest.approx(PUBLISHED[name], rel=0.01)


def test_big_preset_builds_on_meta_with_the_estimated_count():
    cfg = load_model_preset("llama3-405b")
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == estimate(cfg).total_params


def test_six_n_rule_holds_when_attention_is_negligible():
    cfg = load_model_preset("llama2-7b")
    est = estimate(cfg, seq_len=1)
    assert est.train_flops_per_token == pytest.approx(6 * est.matmul_params, rel=1e-4)
    assert est.matmul_params == est.total_params - est.embedding_params - (2 * 32 + 1) * 4096


def test_attention_term_grows_linearly_with_context():
    cfg = load_model_preset("llama3-8b")
    a, b = estimate(cfg, 1024), estimate(cfg, 2048)
    per_token_attention = 4 * 32 * 1024 * 4096  # 4 * L * dT * d_attn, forward
    assert b.forward_flops_per_token - a.forward_flops_per_token == per_token_attention
    with pytest.raises(ValueError, match="seq_len"):
        estimate(cfg, 0)


# MoE presets: (transformers class, published total, published active, tolerance). Sources: OLMoE
# paper (Muennighoff et al. 2024: 6.9B / 1.3B), Qwen3-30B-A3B model card (30.5B / 3.3B), the
# Qwen1.5-MoE blog (14.3B / 2.7B), FlexOlmo paper (Shi et al. 2025: 37B / 20B, its 8-expert top-4
# model). Two-digit figures are truncations of exact counts up to 1.6% above them (3.353B for
# Qwen3's "3.3B", 37.6B for FlexOlmo's "37B"): those get 2%, the rest 1%.
MOE_PRESETS = {
    "olmoe-1b-7b": ({}, 6.9e9, 1.3e9, 0.02),
    "qwen3-30b-a3b": ({}, 30.5e9, 3.3e9, 0.02),
    "qwen1.5-moe-a2.7b": ({}, 14.3e9, 2.7e9, 0.01),
    "flexolmo-7x7b": ({"num_experts": 8, "top_k": 4}, 37e9, 20e9, 0.02),
}


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_moe_presets_count_what_transformers_builds_and_what_was_published(name):
    transformers = pytest.importorskip("transformers")
    from dataclasses import replace

    from moe_lab.interop.hf import config_to_hf

    moe_changes, total, active, rel = MOE_PRESETS[name]
    cfg = load_model_preset(name)
    cfg = replace(cfg, moe=replace(cfg.moe, **moe_changes))
    with torch.device("meta"):  # the independent count: transformers' own model of that shape
        theirs = getattr(transformers, cfg.hf_architecture)(config_to_hf(cfg))
    theirs_total = sum(p.numel() for p in theirs.parameters())
    experts = [layer.mlp.experts for layer in theirs.model.layers if hasattr(layer.mlp, "experts")]
    unused = sum(
        (e.gate_up_proj.numel() + e.down_proj.numel())
        * (e.num_experts - cfg.moe.top_k)
        // e.num_experts
        for e in experts
    )
    est = estimate(cfg, 4096)
    assert est.total_params == theirs_total
    assert est.active_params == theirs_total - unused
    assert est.total_params == pytest.approx(total, rel=rel)
    assert est.active_params == pytest.approx(active, rel=rel)
