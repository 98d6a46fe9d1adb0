"""Stacked experts (k dense experts as one batch) against each expert run alone, over every option
of a dense model that changes which weights the forward reads."""

import dataclasses

import pytest
import torch

from moe_lab import ModelConfig, build_model
from moe_lab.config import MoEConfig
from moe_lab.ensembles.stacked import StackedExperts

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden=48,
                  init_std=0.3, max_seq_len=32)  # fmt: skip
OPTIONS = [
    {},
    {"attention_bias": "all", "qk_norm": "projection"},
    {"attention_bias": "qkv", "qk_norm": "head", "norm_position": "post", "tie_embeddings": True},
]


def _experts(cfg, n=3):
    torch.manual_seed(0)
    experts = [build_model(cfg).eval() for _ in range(n)]
    with torch.no_grad():  # norms and biases start at 1 and 0: make them differ between experts
        for p in (p for e in experts for p in e.parameters()):
            p.add_(torch.randn_like(p), alpha=0.1)
    return experts


NAMES = ["plain", "all-biases-qk-norm", "head-norm-post-norm-tied"]


@pytest.mark.parametrize("options", OPTIONS, ids=NAMES)
def test_row_i_of_the_stacked_experts_is_expert_i(options):
    experts = _experts(dataclasses.replace(CFG, **options))
    stacked = StackedExperts(experts)
    prompt, step = torch.randint(0, 64, (3, 7)), torch.randint(0, 64, (3, 1))
    cache = stacked.new_cache(10)
    first, second = stacked.last_logits(prompt, cache), stacked.last_logits(step, cache)
    with torch.no_grad():
        for i, expert in enumerate(experts):
            alone = expert(torch.cat([prompt[i : i + 1], step[i : i + 1]], 1)).logits[0]
            torch.testing.assert_close(first[i], alone[-2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(second[i], alone[-1], rtol=1e-5, atol=1e-5)
    assert cache.length == 8


def test_only_dense_experts_of_one_configuration_stack():
    dense = _experts(CFG, 2)
    moe = build_model(dataclasses.replace(CFG, moe=MoEConfig(num_experts=4, top_k=2)))
    wider = build_model(dataclasses.replace(CFG, ffn_hidden=64))
    for experts, said in (([*dense, moe], "MoE"), ([*dense, wider], "2 configuration")):
        with pytest.raises(ValueError, match=said):
            StackedExperts(experts)
    with pytest.raises(ValueError, match=r"shape \[2, T\], one row per expert"):
        StackedExperts(dense).last_logits(torch.zeros(3, 4, dtype=torch.long))
