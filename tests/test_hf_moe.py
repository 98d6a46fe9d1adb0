"""Logits parity with transformers' OLMoE, Qwen2-MoE, Qwen3-MoE and FlexOlmo, both directions, in
memory and through sharded directories; the auxiliary loss equals transformers'."""

from dataclasses import replace

import pytest
import torch

from moe_lab import ModelConfig, build_model
from moe_lab.config import MoEConfig
from moe_lab.interop.hf import config_to_hf, from_hf, to_hf
from moe_lab.nn.routing import load_balancing_loss

transformers = pytest.importorskip("transformers")

TOL = 1e-5
BASE = dict(
    dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=101, ffn_hidden=80, max_seq_len=64,
    init_std=0.1,
)  # fmt: skip


# OLMoE, Mixtral and FlexOlmo have no dense layer: their one intermediate_size is the experts'
ALL_MOE = {"ffn_hidden": 32}


def _moe(**kw):
    return MoEConfig(num_experts=4, top_k=2, expert_hidden=32, lbl="mixtral", lbl_weight=0.02,
                     z_loss_weight=0.0, **kw)  # fmt: skip


CASES = {
    "OlmoeForCausalLM": ModelConfig(
        **BASE | ALL_MOE, qk_norm="projection", moe=_moe(renormalize=False)
    ),
    "OlmoeForCausalLM-biases-tied": ModelConfig(
        **BASE | ALL_MOE, qk_norm="projection", attention_bias="all", tie_embeddings=True,
        moe=_moe(),
    ),
    "Qwen2MoeForCausalLM": ModelConfig(
        **BASE, attention_bias="qkv",
        moe=_moe(renormalize=False, shared_expert_hidden=40, shared_expert_gate=True,
                 dense_layers=[1]),
    ),
    "Qwen2MoeForCausalLM-every-2": ModelConfig(
        **BASE | {"n_layers": 4},
        moe=_moe(every=2, shared_expert_hidden=24, shared_expert_gate=True),
    ),
    "Qwen3MoeForCausalLM": ModelConfig(
        **BASE, qk_norm="head", head_dim=24, moe=_moe(dense_layers=[0])
    ),
    "FlexOlmoForCausalLM": ModelConfig(
        **BASE | ALL_MOE, qk_norm="projection", norm_position="post",
        moe=_moe(renormalize=False),
    ),
    "FlexOlmoForCausalLM-head-dim": ModelConfig(
        **BASE | ALL_MOE | {"n_kv_heads": 1}, qk_norm="projection", norm_position="post",
        head_dim=24, rope_theta=500000.0, moe=_moe(renormalize=False),
    ),
}  # fmt: skip


def _arch(case: str) -> str:
    return case.split("-")[0]


def _ours(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so each one is checked
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _max_diff(ours, theirs, tokens):
    with torch.no_grad():
        return (ours(tokens).logits - theirs(tokens).logits).abs().max().item()


@pytest.fixture
def tokens():
    return torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", CASES)
def test_export_matches_and_imports_back_bit_exactly(case, tokens, tmp_path):
    cfg = CASES[case]
    ours = _ours(cfg)
    theirs = to_hf(ours, _arch(case))
    assert type(theirs).__name__ == _arch(case)
    assert _max_diff(ours, theirs, tokens) <= TOL
    again = from_hf(theirs)
    assert again.cfg == replace(cfg, hf_architecture=_arch(case))
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # sharded on disk: model.safetensors.index.json and several files
    theirs.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    from_disk = from_hf(tmp_path)
    assert _max_diff(from_disk, theirs, tokens) <= TOL
    assert type(to_hf(from_disk)).__name__ == _arch(case)  # the architecture it came from


@pytest.mark.parametrize("case", ["OlmoeForCausalLM", "Qwen2MoeForCausalLM",
                                  "Qwen3MoeForCausalLM", "FlexOlmoForCausalLM"])  # fmt: skip
def test_import_of_a_transformers_model_and_its_aux_loss(case, tokens):
    """Start on transformers' side, with its own init; the auxiliary loss is checked against
    transformers' load_balancing_loss_func (times router_aux_loss_coef)."""
    torch.manual_seed(1)
    theirs = getattr(transformers, case)(config_to_hf(CASES[case], case)).eval()
    with torch.no_grad():  # transformers inits norms to 1: perturb them, and the router
        for name, p in theirs.named_parameters():
            if "norm" in name or name.endswith("bias") or name.endswith("mlp.gate.weight"):
                p.add_(0.3 * torch.randn_like(p))
    ours = from_hf(theirs)
    assert _max_diff(ours, theirs, tokens) <= TOL
    with torch.no_grad():
        expected = theirs(tokens, output_router_logits=True).aux_loss
        out = ours(tokens)
    torch.testing.assert_close(load_balancing_loss(out.routing, "mixtral"), expected)
    coef = theirs.config.router_aux_loss_coef
    torch.testing.assert_close(out.aux_loss, coef * expected)


@pytest.mark.parametrize(
    "case, target, message",
    [
        ("Qwen3MoeForCausalLM", "OlmoeForCausalLM",
         r"as OlmoeForCausalLM: model.qk_norm='head' \(Olmoe: projection\); model.head_dim=24"),
        ("FlexOlmoForCausalLM", "MixtralForCausalLM",
         r"model.qk_norm='projection' \(Mixtral: none\); model.norm_position='post'.*"
         r"renormalise"),
        ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
         r"attention_bias='qkv' \(Qwen3Moe: none or all\).*shared_expert_hidden=40"),
        ("OlmoeForCausalLM", "Qwen2MoeForCausalLM",
         r"qk_norm='projection'.*a sigmoid-gated shared expert"),
        ("Qwen2MoeForCausalLM-every-2", "FlexOlmoForCausalLM",
         r"every=2, dense_layers=\[\] \(FlexOlmo: every layer is MoE\)"),
        ("OlmoeForCausalLM", "LlamaForCausalLM", r"model.moe \(Llama is a dense model\)"),
        ("OlmoeForCausalLM", "GPT2LMHeadModel", r"unknown architecture 'GPT2LMHeadModel'"),
    ],
)  # fmt: skip
def test_settings_a_target_cannot_express_are_named(case, target, message):
    with pytest.raises(ValueError, match=message):
        to_hf(build_model(CASES[case], device="meta"), target)


def test_unsupported_options_of_the_new_families_are_refused(tmp_path):
    olmoe = config_to_hf(CASES["OlmoeForCausalLM"], "OlmoeForCausalLM")
    olmoe.clip_qkv = 8.0
    with pytest.raises(ValueError, match=r"clip_qkv=8.0"):
        from_hf(transformers.OlmoeForCausalLM(olmoe))
    qwen = config_to_hf(CASES["Qwen3MoeForCausalLM"], "Qwen3MoeForCausalLM")
    qwen.use_sliding_window, qwen.sliding_window = True, 16
    with pytest.raises(ValueError, match=r"sliding_window=16"):
        from_hf(transformers.Qwen3MoeForCausalLM(qwen))
