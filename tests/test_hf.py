"""Logits parity with transformers' LlamaForCausalLM, both directions, in memory and on disk."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_lab import ModelConfig, build_model
from moe_lab.config import RopeScalingConfig
from moe_lab.interop.hf import config_to_hf, from_hf, to_hf
from moe_lab.store.weights import WeightsMismatchError

transformers = pytest.importorskip("transformers")

BASE = dict(
    dim=64, n_layers=2, n_heads=4, vocab_size=101, ffn_hidden=96, max_seq_len=128, init_std=0.1
)
CASES = {
    "mha": ModelConfig(**BASE),
    "gqa_theta": ModelConfig(**BASE | {"n_kv_heads": 2, "rope_theta": 500000.0}),
    "mqa_tied": ModelConfig(**BASE | {"n_kv_heads": 1, "tie_embeddings": True}),
    "biases": ModelConfig(**BASE | {"n_kv_heads": 2, "attention_bias": "all"}),
    "llama31_scaling": ModelConfig(
        **BASE
        | {
            "n_kv_heads": 2,
            "rope_theta": 500000.0,
            "rope_scaling": RopeScalingConfig(factor=8.0, original_max_seq_len=32),
        }
    ),
}
TOL = 1e-5


def _hf_model(cfg):
    return transformers.LlamaForCausalLM(config_to_hf(cfg)).eval()


def _max_diff(ours, theirs, x):
    with torch.no_grad():
        return (ours(x).logits - theirs(x).logits).abs().max().item()


@pytest.fixture
def tokens():
    return torch.randint(0, 101, (2, 100))


@pytest.mark.parametrize("name", CASES)
def test_from_hf_in_memory(name, tokens):
    theirs = _hf_model(CASES[name])
    ours = from_hf(theirs)
    assert ours.cfg == replace(CASES[name], hf_architecture="LlamaForCausalLM")
    assert _max_diff(ours, theirs, tokens) <= TOL


@pytest.mark.parametrize("name", CASES)
def test_from_hf_saved_directory(name, tokens, tmp_path):
    theirs = _hf_model(CASES[name])
    theirs.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert ours.cfg == replace(CASES[name], hf_architecture="LlamaForCausalLM")
    assert _max_diff(ours, theirs, tokens) <= TOL


@pytest.mark.parametrize("name", CASES)
def test_to_hf_and_back_through_disk(name, tokens, tmp_path):
    ours = build_model(CASES[name])
    theirs = to_hf(ours)
    assert isinstance(theirs, transformers.LlamaForCausalLM)
    assert _max_diff(ours, theirs, tokens) <= TOL
    theirs.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert _max_diff(ours, reloaded, tokens) <= TOL
    again = from_hf(tmp_path)
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_parity_test_is_sensitive_to_rope_scaling(tokens):
    """Guard: dropping the Llama 3.1 scaling must break parity, so the case above tests it."""
    cfg = CASES["llama31_scaling"]
    theirs = _hf_model(cfg)
    ours = from_hf(theirs)
    ours.cfg.rope_scaling, ours._inv_freq = None, None
    assert _max_diff(ours, theirs, tokens) > 1e-3


def test_unsupported_architecture_lists_supported(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10, n_positions=16)
    )
    with pytest.raises(
        ValueError, match=r"unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"
    ):
        from_hf(gpt2)
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"supported: LlamaForCausalLM"):
        from_hf(tmp_path)


def test_unsupported_llama_options_are_refused(tmp_path):
    hf_cfg = config_to_hf(CASES["mha"])
    hf_cfg.mlp_bias = True
    with pytest.raises(ValueError, match="mlp_bias"):
        from_hf(transformers.LlamaForCausalLM(hf_cfg))


def test_shape_mismatch_names_the_tensor_and_loads_nothing(tmp_path):
    _hf_model(CASES["mha"]).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    weights[key] = weights[key][:50].contiguous()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        WeightsMismatchError, match=r"layers\.1\.feed_forward\.w3\.weight \(got \(50, 64\)"
    ):
        from_hf(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    _hf_model(CASES["mha"]).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.weight"]
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        WeightsMismatchError, match=r"missing: layers\.0\.attention\.wk\.weight.*unexpected"
    ):
        from_hf(tmp_path)


def test_directory_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(CASES["mha"]).to_dict()))
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path / "missing")


# ---- Mixtral -------------------------------------------------------------------------------------

from moe_lab.config import MoEConfig  # noqa: E402
from moe_lab.nn.routing import load_balancing_loss  # noqa: E402

MIXTRAL = ModelConfig(
    **BASE
    | {
        "n_kv_heads": 2,
        "ffn_hidden": 48,
        "moe": MoEConfig(
            num_experts=4,
            top_k=2,
            expert_hidden=48,
            lbl="mixtral",
            lbl_weight=0.02,
            z_loss_weight=0.0,
        ),
    }
)
MIXTRAL_CASES = {
    "untied": MIXTRAL,
    "tied_theta": replace(MIXTRAL, tie_embeddings=True, rope_theta=500000.0),
}


@pytest.mark.parametrize("name", MIXTRAL_CASES)
def test_mixtral_import_in_memory_and_from_disk(name, tokens, tmp_path):
    cfg = MIXTRAL_CASES[name]
    theirs = transformers.MixtralForCausalLM(config_to_hf(cfg)).eval()
    assert from_hf(theirs).cfg == replace(cfg, hf_architecture="MixtralForCausalLM")
    assert _max_diff(from_hf(theirs), theirs, tokens) <= TOL
    theirs.save_pretrained(tmp_path)
    assert _max_diff(from_hf(tmp_path), theirs, tokens) <= TOL


@pytest.mark.parametrize("name", MIXTRAL_CASES)
def test_mixtral_export_and_round_trip(name, tokens, tmp_path):
    ours = build_model(MIXTRAL_CASES[name])
    theirs = to_hf(ours)
    assert isinstance(theirs, transformers.MixtralForCausalLM)
    assert _max_diff(ours, theirs, tokens) <= TOL
    theirs.save_pretrained(tmp_path)
    again = from_hf(tmp_path)
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_mixtral_lbl_form_equals_transformers_aux_loss(tokens):
    """transformers' load_balancing_loss_func is the independent reference for lbl=mixtral."""
    ours = build_model(MIXTRAL)
    theirs = to_hf(ours)
    with torch.no_grad():
        expected = theirs(tokens, output_router_logits=True).aux_loss
        got = load_balancing_loss(ours(tokens).routing, "mixtral")
    torch.testing.assert_close(got, expected)


def test_moe_that_mixtral_cannot_express_is_refused_with_reasons():
    moe = replace(MIXTRAL.moe, every=2, capacity_factor=1.0, jitter=0.1)
    with pytest.raises(ValueError, match=r"capacity_factor set.*jitter.*every=2"):
        to_hf(build_model(replace(MIXTRAL, moe=moe)))


def test_imported_mixtral_has_no_meta_tensors_and_moves_dtype():
    ours = from_hf(transformers.MixtralForCausalLM(config_to_hf(MIXTRAL)))
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    ours.to(torch.float64)
    assert ours.layers[0].feed_forward.router.tokens_per_expert.dtype == torch.float64


@pytest.mark.parametrize("kind", ["byte-dense", "bpe-moe"])
def test_an_exported_run_loads_in_transformers_and_continues_text_the_same(tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_lab.cli import main
    from moe_lab.data.documents import CORPUS_DIR, load_documents
    from moe_lab.data.tokenizer import train_bpe
    from moe_lab.eval.generation import generate
    from moe_lab.store.checkpoint import load_run
    from tests.tiny import MOE, write_run

    if kind == "byte-dense":
        write_run(tmp_path / "run")
    else:
        write_run(tmp_path / "run", *MOE, "model.vocab_size=320")
        docs = load_documents([str(CORPUS_DIR / "valid.jsonl.gz")], "text", [])["text"]
        train_bpe(iter(docs[:200]), 300).save(tmp_path / "run" / "tokenizer")  # replaces bytes
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "hf")]) == 0
    _, ours, tokenizer = load_run(tmp_path / "run")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    text = "The court held that Straße"
    ids = tokenizer.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids and hf_tok.decode(ids) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id)
    prompt = torch.tensor([[tokenizer.bos_id, *ids]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(prompt).logits, ours(prompt).logits, rtol=1e-4, atol=1e-4)
        expected = generate(ours, prompt, max_new_tokens=12)
        got = theirs.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert got.tolist() == expected.tolist()
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "hf")]) == 2  # not empty
