"""The grouped-GEMM backend against the reference: fp32 on CPU (exact up to summation order), bf16
on CUDA (``gpu``), whole graphs under ``torch.compile`` on CUDA."""

from dataclasses import replace

import pytest
import torch

from moe_lab import build_model
from moe_lab.config import MoEConfig, load_config
from moe_lab.nn.experts import GroupedMoE, MoE, resolve_backend
from moe_lab.nn.experts.grouped import grouped_swiglu
from tests.conftest import assert_bf16_parity_on_cuda, backend_pair, rel_error, run_layer

D = 32


def _pair(**kw) -> tuple[MoE, GroupedMoE]:
    return backend_pair(GroupedMoE, "grouped", D, **{"expert_hidden": 48, **kw})


def test_grouped_swiglu_equals_a_loop_over_experts_with_an_empty_one():
    torch.manual_seed(0)
    E, Fh = 4, 16
    w1, v1, w2 = (torch.randn(E * Fh, D) for _ in range(3))
    counts = [3, 0, 5, 2]  # expert 1 gets no slot
    x = torch.randn(sum(counts), D)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    expected, start = [], 0
    for e, n in enumerate(counts):
        rows = slice(e * Fh, (e + 1) * Fh)
        xe = x[start : start + n]
        expected.append(
            (torch.nn.functional.silu(xe @ w1[rows].t()) * (xe @ v1[rows].t())) @ w2[rows]
        )
        start += n
    torch.testing.assert_close(grouped_swiglu(x, w1, v1, w2, offsets), torch.cat(expected))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"top_k": 1},
        {"capacity_factor": 0.5},  # drops slots: masked, not skipped
        {"score": "sigmoid", "renormalize": False},
        {"shared_expert_hidden": 16, "shared_expert_gate": True},
    ],
)
def test_grouped_equals_the_reference_outputs_gradients_and_stats_in_fp32(kw):
    torch.manual_seed(0)
    ref, grouped = _pair(**kw)
    x, grad = torch.randn(2, 24, D), torch.randn(2, 24, D)
    y_r, s_r, dx_r, g_r = run_layer(ref, x, grad)
    y_g, s_g, dx_g, g_g = run_layer(grouped, x, grad)
    if "capacity_factor" in kw:
        assert s_r.dropped > 0.1  # the case exercises dropping
    torch.testing.assert_close(y_g, y_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_g, dx_r, rtol=1e-5, atol=1e-6)
    for name in g_r:
        torch.testing.assert_close(g_g[name], g_r[name], rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(s_g, s_r, strict=True):
        torch.testing.assert_close(a, b)


def test_grouped_runs_a_restriction_to_fewer_experts_than_top_k():
    ref, grouped = _pair()
    for layer in (ref, grouped):
        layer.router.restrict([5])
    x = torch.randn(10, D)
    torch.testing.assert_close(grouped(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)


def test_a_reference_checkpoint_trains_the_same_on_grouped():
    cfg = load_config(overrides=["model.moe.num_experts=4", "model.moe.expert_hidden=32"]).model
    ref = build_model(cfg)
    grouped = build_model(replace(cfg, moe=replace(cfg.moe, backend="grouped")))
    assert isinstance(grouped.layers[0].feed_forward, GroupedMoE)
    grouped.load_state_dict(ref.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    losses = []
    for model in (ref, grouped):
        loss, aux, _ = model.loss(x, x.roll(-1, dims=1))
        (loss + aux).backward()
        losses.append((loss.item(), aux.item(), model.layers[0].feed_forward.w1.grad))
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-6)
    assert losses[1][1] == pytest.approx(losses[0][1], rel=1e-6)
    assert rel_error(losses[1][2], losses[0][2]) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only choice")
def test_auto_is_the_reference_on_cpu_and_grouped_runs_where_asked():
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=32)
    assert resolve_backend(replace(moe, backend="auto")) == "reference"
    assert resolve_backend(replace(moe, backend="grouped")) == "grouped"


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{}, {"top_k": 1}, {"shared_expert_hidden": 64}])
def test_grouped_equals_the_reference_in_bf16_on_cuda(kw):
    assert_bf16_parity_on_cuda(*_pair(**kw), D, autocast=True)
    assert resolve_backend(MoEConfig(backend="auto")) == "grouped"


@pytest.mark.gpu
def test_grouped_compiles_to_one_graph_on_cuda():
    """No host synchronisation: the layer traces whole (fullgraph would raise on a break)."""
    _, grouped = _pair()
    grouped.cuda()
    x = torch.randn(2, 64, D, device="cuda")
    compiled = torch.compile(grouped, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert rel_error(compiled(x)[0], grouped(x)[0]) < 1e-2
