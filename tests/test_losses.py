import pytest
import torch
import torch.nn.functional as F

from moe_lab import ModelConfig, build_model
from moe_lab.nn.losses import fused_linear_cross_entropy


def _reference(h, w, t):
    return F.cross_entropy(F.linear(h, w).flatten(0, -2), t.flatten(), ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_fused_loss_and_gradients_equal_the_unfused_reference(chunk):
    h = torch.randn(3, 21, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (3, 21))
    t[0, :5] = -100  # ignored targets count neither in the sum nor in the mean
    expected = _reference(h, w, t)
    gh, gw = torch.autograd.grad(expected * 3.0, (h, w))
    got = fused_linear_cross_entropy(h, w, t, chunk=chunk)
    fh, fw = torch.autograd.grad(got * 3.0, (h, w))  # a non-unit upstream gradient
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(fh, gh)
    torch.testing.assert_close(fw, gw)


def test_fused_loss_without_grad_and_with_every_target_ignored():
    h, w = torch.randn(10, 8), torch.randn(30, 8)
    t = torch.randint(0, 30, (10,))
    with torch.no_grad():
        torch.testing.assert_close(
            fused_linear_cross_entropy(h, w, t, chunk=3), _reference(h, w, t)
        )
    none = fused_linear_cross_entropy(h.requires_grad_(), w, torch.full((10,), -100))
    assert none.item() == 0.0
    none.backward()
    assert h.grad.abs().max() == 0


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_equals_cross_entropy_over_forward_logits(tied):
    cfg = ModelConfig(
        dim=32,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=48,
        vocab_size=97,
        tie_embeddings=tied,
        init_std=0.1,
    )
    a, b = build_model(cfg), build_model(cfg)
    b.load_state_dict(a.state_dict())
    x, t = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 24))
    out = a(x)
    reference = F.cross_entropy(out.logits.flatten(0, 1), t.flatten())
    reference.backward()
    loss, aux, _ = b.loss(x, t)
    loss.backward()
    torch.testing.assert_close(loss, reference)
    assert aux.item() == 0.0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)


def test_token_nll_equals_unreduced_cross_entropy():
    from moe_lab.nn.losses import token_nll

    h, w = torch.randn(2, 13, 8, dtype=torch.float64), torch.randn(40, 8, dtype=torch.float64)
    t = torch.randint(0, 40, (2, 13))
    t[1, 3:7] = -100
    expected = F.cross_entropy(
        F.linear(h, w).transpose(1, 2), t, ignore_index=-100, reduction="none"
    )
    got = token_nll(h, w, t, chunk=5)
    assert got.shape == (2, 13) and torch.all(got[1, 3:7] == 0)
    torch.testing.assert_close(got, expected)
