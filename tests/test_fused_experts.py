"""The hand-written expert Function against autograd: gradcheck, a naive slot loop, the MoE loop."""

import pytest
import torch
import torch.nn.functional as F

from moe_lab.config import MoEConfig
from moe_lab.nn.experts import MoE
from moe_lab.nn.experts.fused import swiglu_experts
from tests.conftest import rel_error, to_bf16_grid

E, D, FH, N = 4, 6, 5, 7
COUNTS = [3, 0, 5, 2]  # expert 1 gets no slot: its gradient must be zero, not garbage


def _inputs(gathered: bool):
    g = torch.Generator().manual_seed(0)
    S = sum(COUNTS)
    x = torch.randn(N if gathered else S, D, dtype=torch.float64, generator=g)
    ws = [torch.randn(E * FH, D, dtype=torch.float64, generator=g) for _ in range(3)]
    rows = torch.randint(0, N, (S,), generator=g) if gathered else None  # repeats: top-k > 1
    scale = torch.rand(S, dtype=torch.float64, generator=g) if gathered else None
    leaves = [t.requires_grad_() for t in (x, *ws, scale) if t is not None]
    return x, ws, rows, scale, leaves


def _slot_loop(x, ws, rows, scale):
    """Slot by slot: y[row] += scale * SwiGLU_e(x[row]), autograd all the way."""
    w1, v1, w2 = (w.view(E, FH, D) for w in ws)
    experts = torch.repeat_interleave(torch.arange(E), torch.tensor(COUNTS))
    y = [torch.zeros(D, dtype=x.dtype) for _ in range(len(x))]
    for s, e in enumerate(experts.tolist()):
        r = s if rows is None else rows[s].item()
        out = (F.silu(w1[e] @ x[r]) * (v1[e] @ x[r])) @ w2[e]
        y[r] = y[r] + (out if scale is None else scale[s] * out)
    return torch.stack(y)


@pytest.mark.parametrize("gathered", [True, False], ids=["gathered-scaled", "in-place-rows"])
def test_outputs_and_gradients_equal_autograd_through_a_slot_loop(gathered):
    x, ws, rows, scale, leaves = _inputs(gathered)
    y = swiglu_experts(x, *ws, COUNTS, rows, scale)
    expected = _slot_loop(x, ws, rows, scale)
    torch.testing.assert_close(y, expected)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    want = torch.autograd.grad(expected, leaves, dy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert got[1].view(E, FH, D)[1].abs().max() == 0  # the expert without slots


@pytest.mark.parametrize("gathered", [True, False], ids=["gathered-scaled", "in-place-rows"])
def test_gradcheck(gathered):
    x, ws, rows, scale, leaves = _inputs(gathered)

    def fn(*args):
        if gathered:
            *args, scale_ = args
            return swiglu_experts(*args, COUNTS, rows, scale_)
        return swiglu_experts(*args, COUNTS)

    assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_moe_layer_fused_equals_the_autograd_expert_loop(capacity_factor):
    cfg = MoEConfig(num_experts=6, top_k=2, expert_hidden=24, capacity_factor=capacity_factor)
    layer = MoE(16, cfg, n_layers=2, init_std=0.3)
    layer.reset_parameters()
    x = torch.randn(50, 16, requires_grad=True)
    dy = torch.randn(50, 16)
    results = []
    for fused in (True, False):
        layer.fused = fused
        x.grad = None
        layer.zero_grad()
        y, _ = layer(x)
        y.backward(dy)
        grads = [
            p.grad.clone() for p in (x, layer.w1, layer.v1, layer.w2, layer.router.gate.weight)
        ]
        results.append((y.detach(), *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd-loop"])
def test_moe_layer_under_bf16_autocast_computes_in_bf16_and_trains_the_fp32_weights(fused):
    """Autocast runs the expert GEMMs in bf16 while the scatter-add buffer stayed fp32: this
    failed with a dtype mismatch in index_add_ (CPU and CUDA alike) until the layer cast once."""
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=32)
    layer = MoE(16, cfg, n_layers=2, init_std=0.3)
    layer.reset_parameters()
    layer.fused = fused
    to_bf16_grid(layer)
    x = torch.randn(40, 16).to(torch.bfloat16).float()  # the input on the bf16 grid too
    dy = torch.randn(40, 16)
    results = []
    for autocast in (False, True):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, stats = layer(x)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        y.float().backward(dy)
        grads = [p.grad for p in (layer.w1, layer.v1, layer.w2, layer.router.gate.weight)]
        assert all(g.dtype == torch.float32 for g in grads)
        results.append((y.float(), stats.slot_counts_KE, *grads))
    (y32, n32, *g32), (y16, n16, *g16) = results
    assert torch.equal(n16, n32)  # the router scores in fp32 either way
    torch.testing.assert_close(y16, y32, atol=2e-2, rtol=2e-2)
    for a, b in zip(g16, g32, strict=True):
        assert rel_error(a, b) < 2e-2
