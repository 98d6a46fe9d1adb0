"""The MegaBlocks backend: errors and layout on CPU; parity with the reference on CUDA (``gpu``)."""

from dataclasses import replace

import pytest
import torch

from moe_lab import build_model
from moe_lab.config import ConfigError, load_config
from moe_lab.nn.experts import MegaBlocksMoE, MoE, resolve_backend
from moe_lab.nn.experts.megablocks import import_megablocks
from tests.conftest import assert_bf16_parity_on_cuda, backend_pair

D = 64


def _pair(**kw) -> tuple[MoE, MegaBlocksMoE]:
    """A reference layer and a MegaBlocks layer holding the same weights."""
    return backend_pair(MegaBlocksMoE, "megablocks", D, **{"expert_hidden": 128, **kw})


def test_megablocks_layer_has_the_reference_state_dict_key_for_key():
    ref, mb = _pair(shared_expert_hidden=32)
    assert list(mb.state_dict()) == list(ref.state_dict())
    for name, value in ref.state_dict().items():
        assert torch.equal(mb.state_dict()[name], value), name


def test_megablocks_layer_on_cpu_says_it_needs_cuda():
    _, mb = _pair()
    with pytest.raises(RuntimeError, match="megablocks backend runs on CUDA only"):
        mb(torch.randn(4, D))


def test_a_restriction_below_top_k_runs_the_reference_experts():
    """dMoE is built for top_k slots per token: one allowed expert of a top-2 layer must not reach
    it (it would pair slots with the wrong tokens); the reference path runs, on CPU too."""
    ref, mb = _pair()
    for layer in (ref, mb):
        layer.router.restrict([3])
    x = torch.randn(6, D)
    torch.testing.assert_close(mb(x)[0], ref(x)[0], rtol=0, atol=0)


def test_missing_megablocks_says_how_to_install_it():
    try:
        import megablocks  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("megablocks imports here")
    with pytest.raises(ConfigError, match=r"pip install 'moe_lab\[gpu\]'"):
        import_megablocks()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_backend_megablocks_without_cuda_is_a_clear_error_and_auto_is_the_reference():
    cfg = load_config(overrides=["model.moe.backend=megablocks"]).model
    with pytest.raises(ConfigError, match=r"model\.moe\.backend is 'megablocks', which needs CUDA"):
        build_model(cfg)
    assert resolve_backend(replace(cfg.moe, backend="auto")) == "reference"
    assert (
        type(build_model(replace(cfg, moe=replace(cfg.moe, backend="auto"))).layers[0].feed_forward)
        is MoE
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"top_k": 1},
        {"renormalize": False},
        {"score": "sigmoid"},
        {"shared_expert_hidden": 64},
        {"shared_expert_hidden": 64, "shared_expert_gate": True},  # Qwen2-MoE
    ],
)
def test_megablocks_equals_the_reference_outputs_gradients_and_losses(kw):
    """Same weights, same routing (one router), the experts on either side: MegaBlocks computes
    in bf16, so outputs and gradients agree to bf16 precision, the router stats exactly."""
    pytest.importorskip("megablocks")
    assert_bf16_parity_on_cuda(*_pair(**kw), D)


@pytest.mark.gpu
def test_a_reference_checkpoint_runs_on_megablocks_with_the_same_loss():
    pytest.importorskip("megablocks")
    cfg = load_config(overrides=["model.moe.num_experts=8", "model.moe.expert_hidden=128"]).model
    ref = build_model(cfg).cuda()
    mb = build_model(replace(cfg, moe=replace(cfg.moe, backend="megablocks"))).cuda()
    assert isinstance(mb.layers[0].feed_forward, MegaBlocksMoE)
    mb.load_state_dict(ref.state_dict())
    x = torch.randint(0, cfg.vocab_size, (4, 128), device="cuda")
    targets = x.roll(-1, dims=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_r, aux_r, _ = ref.loss(x, targets)
        loss_m, aux_m, _ = mb.loss(x, targets)
    assert abs(loss_m.item() - loss_r.item()) < 1e-2 * loss_r.item()
    assert abs(aux_m.item() - aux_r.item()) < 1e-2 * aux_r.item()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["OlmoeForCausalLM", "Qwen2MoeForCausalLM", "FlexOlmoForCausalLM"])
def test_an_imported_transformers_moe_runs_on_megablocks_with_the_same_loss(arch):
    pytest.importorskip("megablocks")
    transformers = pytest.importorskip("transformers")
    from moe_lab.interop.hf import config_to_hf, from_hf
    from tests.test_hf_moe import CASES

    torch.manual_seed(0)
    ref = from_hf(getattr(transformers, arch)(config_to_hf(CASES[arch], arch))).cuda()
    cfg = ref.cfg
    mb = build_model(replace(cfg, moe=replace(cfg.moe, backend="megablocks"))).cuda()
    mb.load_state_dict(ref.state_dict())
    x = torch.randint(0, cfg.vocab_size, (4, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_r, aux_r, _ = ref.loss(x, x.roll(-1, dims=1))
        loss_m, aux_m, _ = mb.loss(x, x.roll(-1, dims=1))
    assert abs(loss_m.item() - loss_r.item()) < 1e-2 * loss_r.item()
    assert abs(aux_m.item() - aux_r.item()) < 1e-2 * aux_r.item()
