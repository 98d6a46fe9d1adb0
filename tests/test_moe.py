import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moe_lab import ModelConfig, build_model
from moe_lab.accounting import estimate, matched_moe
from moe_lab.config import ConfigError, MoEConfig, load_config
from moe_lab.ensembles.upcycle import upcycle
from moe_lab.nn.experts import MoE, SwiGLU
from moe_lab.nn.experts.moe import capacity, expert_slots
from moe_lab.nn.routing import RouterStats, load_balancing_loss, moe_aux_loss, z_loss

D = 16


def _moe(**kw) -> MoE:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": 24, **kw})
    layer = MoE(D, cfg, n_layers=2, init_std=0.3)
    layer.reset_parameters()
    return layer


def _naive(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token: sum over its chosen experts of weight * SwiGLU_e(x)."""
    E, Fh = layer.cfg.num_experts, layer.cfg.expert_hidden
    w1, v1, w2 = (p.view(E, Fh, D) for p in (layer.w1, layer.v1, layer.w2))
    weights, indices, _, _ = layer.router(x_TD)
    out = torch.zeros_like(x_TD)
    for t in range(len(x_TD)):
        for w, e in zip(weights[t], indices[t], strict=True):
            h = F.silu(w1[e] @ x_TD[t]) * (v1[e] @ x_TD[t])
            out[t] += w * (w2[e].t() @ h)
    return out


def test_one_expert_top_one_equals_the_dense_ffn_outputs_and_gradients():
    dense = SwiGLU(D, 24, n_layers=2, init_std=0.3)
    dense.reset_parameters()
    moe = _moe(num_experts=1, top_k=1)
    with torch.no_grad():
        moe.w1.copy_(dense.w1.weight)
        moe.v1.copy_(dense.w3.weight)
        moe.w2.copy_(dense.w2.weight.t())
    x = torch.randn(3, 5, D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_dense, stats = dense(x)
    y_moe, _ = moe(x2)
    assert stats is None
    torch.testing.assert_close(y_moe, y_dense)
    y_dense.square().sum().backward()
    y_moe.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(moe.w1.grad, dense.w1.weight.grad)
    torch.testing.assert_close(moe.v1.grad, dense.w3.weight.grad)
    torch.testing.assert_close(moe.w2.grad, dense.w2.weight.grad.t())


@pytest.mark.parametrize(
    "kw",
    [{}, {"score": "sigmoid"}, {"renormalize": False}, {"top_k": 1}, {"shared_expert_hidden": 8}],
)
def test_reference_moe_equals_a_naive_per_token_loop(kw):
    layer = _moe(**kw)
    x = torch.randn(40, D)
    expected = _naive(layer, x)
    if layer.shared is not None:
        expected = expected + layer.shared(x)[0]
    torch.testing.assert_close(layer(x)[0], expected)


def test_dropless_equals_capacity_mode_with_unbounded_capacity():
    layer = _moe()
    x = torch.randn(64, D)
    dropless, stats = layer(x)
    layer.cfg = replace(layer.cfg, capacity_factor=layer.cfg.num_experts / layer.cfg.top_k)
    bounded, bounded_stats = layer(x)  # capacity = T: no expert can overflow
    assert capacity(layer.cfg, 64) == 64
    assert torch.equal(dropless, bounded)
    assert stats.dropped.item() == bounded_stats.dropped.item() == 0.0


def test_capacity_drops_by_choice_rank_then_token_order():
    # T=4 tokens, K=2, E=2, capacity 3. First choices: 0,0,0,1; second: 1,1,1,0.
    indices = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    kept = expert_slots(indices, num_experts=2, cap=3)
    # Expert 0 queue: first choices of t0,t1,t2 (kept), then t3's second choice (dropped).
    # Expert 1 queue: t3's first choice, then second choices of t0, t1 (kept), t2 (dropped).
    assert kept.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    layer = _moe(num_experts=2, capacity_factor=0.75)  # ceil(0.75 * 2 * 4 / 2) = 3
    assert capacity(layer.cfg, 4) == 3


def test_dropped_slots_contribute_nothing_and_are_reported():
    layer = _moe(capacity_factor=0.25)
    x = torch.randn(32, D)
    y, stats = layer(x)
    weights, indices, _, _ = layer.router(x)
    kept = expert_slots(indices, 4, capacity(layer.cfg, 32))
    E, Fh = 4, 24
    w1, v1, w2 = (p.view(E, Fh, D) for p in (layer.w1, layer.v1, layer.w2))
    expected = torch.zeros_like(x)
    for t, k in kept.nonzero().tolist():
        e = indices[t, k]
        expected[t] += weights[t, k] * (w2[e].t() @ (F.silu(w1[e] @ x[t]) * (v1[e] @ x[t])))
    torch.testing.assert_close(y, expected)
    assert stats.dropped.item() == pytest.approx(1 - kept.float().mean().item())
    assert stats.dropped.item() > 0


def test_routing_weights_sum_to_one_and_counts_are_t_times_k():
    layer = _moe(num_experts=8, top_k=3)
    weights, indices, _, _ = layer.router(torch.randn(50, D))
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    assert layer.router.tokens_per_expert.sum().item() == 50 * 3


def test_eval_forward_changes_no_router_state():
    layer = _moe(jitter=0.1, bias_update_rate=1e-2)
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(20, D)
    first = layer(x)[0]
    assert torch.equal(first, layer(x)[0])  # no jitter in eval
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    layer.train()
    layer(x)
    assert layer.router.tokens_per_expert.sum().item() == 40


def test_aux_free_bias_moves_against_the_load_and_only_steers_selection():
    layer = _moe(num_experts=4, top_k=1, bias_update_rate=0.1)
    router = layer.router
    router.tokens_per_expert.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    router.update_bias()
    assert router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])
    assert router.tokens_per_expert.sum() == 0
    router.expert_bias.copy_(torch.tensor([0.0, 10.0, 0.0, 0.0]))  # forces expert 1
    weights, indices, probs, _ = layer.router(torch.randn(6, D))
    assert (indices == 1).all()
    torch.testing.assert_close(weights, torch.ones(6, 1))  # renormalised score, bias excluded


def test_aux_free_bias_under_a_restriction_balances_the_allowed_experts_only():
    layer = _moe(num_experts=8, top_k=2, bias_update_rate=0.1)
    router = layer.router
    router.restrict([0, 1, 2, 3])
    router.tokens_per_expert.copy_(torch.tensor([10.0, 20, 30, 40, 0, 0, 0, 0]))
    router.update_bias()
    # against the allowed experts' mean load (25): the forbidden experts' zeros pull it nowhere
    assert router.expert_bias.tolist() == pytest.approx([0.1, 0.1, -0.1, -0.1, 0, 0, 0, 0])


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_router_scores_stay_fp32_under_bf16_autocast(score):
    router = _moe(num_experts=8, score=score).router.eval()
    x = torch.randn(512, D)
    expected = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == e.dtype
        assert torch.equal(g, e)  # with bf16 sigmoid scores 2 of these tokens change experts


# ---- losses --------------------------------------------------------------------------------------


def _stats(probs_TE: torch.Tensor, indices_TK: torch.Tensor) -> RouterStats:
    E = probs_TE.shape[1]
    slot_counts = F.one_hot(indices_TK, E).float().sum(0)
    return RouterStats(
        probs_TE.mean(0), slot_counts, torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)
    )


def _routing(a: float, T: int = 64, E: int = 4) -> RouterStats:
    """A fraction ``a`` of tokens sent to expert 0 with probability 1, the rest uniform."""
    n = round(a * T)
    probs = torch.full((T, E), 1 / E)
    probs[:n] = F.one_hot(torch.zeros(n, dtype=torch.long), E).float()
    indices = torch.cat([torch.zeros(n, dtype=torch.long), torch.arange(T - n) % E])[:, None]
    return _stats(probs, indices)


@pytest.mark.parametrize(
    "form, balanced", [("switch", 1.0), ("olmo", 1.0), ("megablocks", 1.0), ("mixtral", 1.0)]
)
def test_lbl_closed_forms_at_balance_and_collapse_and_monotone_between(form, balanced):
    E, layers = 4, 3
    assert load_balancing_loss([_routing(0.0)] * layers, form).item() == pytest.approx(
        balanced * (layers if form in ("switch", "olmo") else 1)
    )
    per_layer = [load_balancing_loss([_routing(a)], form).item() for a in (0, 0.25, 0.5, 0.75, 1)]
    assert per_layer[-1] == pytest.approx(E)
    assert all(b > a for a, b in zip(per_layer, per_layer[1:], strict=False))


def test_top2_balance_values_and_the_mixtral_cross_layer_form():
    T, E = 64, 4
    uniform = torch.full((T, E), 1 / E)
    idx = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], dim=1)  # balanced, k=2
    s = _stats(uniform, idx)
    assert load_balancing_loss([s], "olmo").item() == pytest.approx(1.0)
    assert load_balancing_loss([s], "mixtral").item() == pytest.approx(2.0)  # k at balance
    # collapse at k=2: first choice expert 0 with probability 1, second choice expert 1 with 0
    one = _stats(F.one_hot(torch.zeros(T, dtype=torch.long), E).float(), torch.tensor([[0, 1]] * T))
    for form, value in {"switch": E, "olmo": E / 2, "megablocks": E / 2, "mixtral": E}.items():
        assert load_balancing_loss([one], form).item() == pytest.approx(value)
    # mixtral multiplies layer-averaged f and P: two opposite collapses look balanced overall
    to0, to1 = (
        _routing(1.0),
        _stats(
            F.one_hot(torch.ones(T, dtype=torch.long), E).float(),
            torch.ones(T, 1, dtype=torch.long),
        ),
    )
    assert load_balancing_loss([to0, to1], "mixtral").item() == pytest.approx(2.0)
    assert load_balancing_loss([to0, to1], "megablocks").item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="unknown load-balancing loss"):
        load_balancing_loss([s], "gshard")


def test_z_loss_closed_form_and_model_aux_loss_composition():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    lse = torch.tensor([math.log(2.0), math.log(4.0)])
    layer = _moe(num_experts=2, top_k=1)
    s = layer.router.stats(logits.softmax(-1), logits, torch.tensor([[0], [0]]), torch.tensor(0.0))
    assert z_loss([s, s]).item() == pytest.approx(2 * lse.square().mean().item())
    cfg = MoEConfig(num_experts=2, top_k=1, lbl="switch", lbl_weight=0.5, z_loss_weight=0.25)
    expected = 0.5 * load_balancing_loss([s], "switch") + 0.25 * z_loss([s])
    torch.testing.assert_close(moe_aux_loss([s], cfg), expected)


# ---- the model -----------------------------------------------------------------------------------

MOE_MODEL = ModelConfig(
    dim=32,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=97,
    ffn_hidden=64,
    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, every=2, shared_expert_hidden=16),
)


def test_moe_every_other_layer_and_aux_loss_in_the_output():
    model = build_model(MOE_MODEL)
    kinds = [type(layer.feed_forward).__name__ for layer in model.layers]
    assert kinds == ["SwiGLU", "MoE", "SwiGLU", "MoE"]
    out = model(torch.randint(0, 97, (2, 12)))
    assert len(out.routing) == 2
    torch.testing.assert_close(out.aux_loss, moe_aux_loss(out.routing, MOE_MODEL.moe))
    assert out.aux_loss.requires_grad and out.aux_loss.item() > 0


def test_moe_params_and_flops_match_the_accountant():
    model = build_model(MOE_MODEL)
    est = estimate(MOE_MODEL, 16)
    assert est.total_params == sum(p.numel() for p in model.parameters())
    expert = 3 * 32 * 32
    assert est.total_params - est.active_params == 2 * (4 - 2) * expert
    tokens = torch.randint(0, 97, (2, 16))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens)
    assert counter.get_total_flops() / tokens.numel() == pytest.approx(
        est.forward_flops_per_token, rel=0.02
    )


def test_matched_moe_has_the_dense_active_ffn_flops():
    dense = load_config(overrides=["model=cpu-small"]).model
    for k in (1, 2, 4):
        moe = matched_moe(dense, num_experts=8, top_k=k)
        d, m = estimate(dense, 256), estimate(moe, 256)
        router = 2 * dense.dim * 8 * dense.n_layers
        assert m.forward_flops_per_token - d.forward_flops_per_token == router
        assert m.total_params > d.total_params
    with pytest.raises(ValueError, match="not divisible"):
        matched_moe(dense, 8, 3)


def test_upcycled_model_computes_what_the_dense_model_did():
    dense = build_model(replace(MOE_MODEL, moe=None))
    moe_cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=64, renormalize=True)
    moe = upcycle(dense, moe_cfg)
    x, t = torch.randint(0, 97, (2, 20)), torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(moe(x).logits, dense(x).logits)
    torch.testing.assert_close(moe.loss(x, t)[0], dense.loss(x, t)[0])
    noisy = upcycle(dense, moe_cfg, noise=0.5)
    assert not torch.allclose(noisy(x).logits, dense(x).logits)
    with pytest.raises(ConfigError, match="must equal model.ffn_hidden"):
        upcycle(dense, replace(moe_cfg, expert_hidden=32))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.moe.top_k=9", r"model\.moe\.top_k \(9\) must not exceed model\.moe\.num_experts"),
        ("model.moe.capacity_factor=0", r"model\.moe\.capacity_factor must be a positive"),
        ("model.moe.lbl=gshard", r"model\.moe\.lbl must be one of switch, megablocks"),
        ("model.moe.score=relu", r"model\.moe\.score must be one of softmax, sigmoid"),
        ("model.moe.every=3", r"model\.moe\.every \(3\) exceeds model\.n_layers \(2\)"),
    ],
)
def test_invalid_moe_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=["model.moe.num_experts=8", override])


def test_a_small_moe_trains_on_the_shipped_corpus_and_logs_routing(tmp_path):
    import json

    from moe_lab.train.loop import train

    result = train(
        load_config(
            overrides=[
                "model.moe.num_experts=4",
                "model.moe.top_k=2",
                "model.moe.every=2",
                "model.moe.capacity_factor=1.25",
                "model.moe.bias_update_rate=1e-3",
                "train.max_steps=30",
                "train.seq_len=64",
                "train.progress=false",
                f"run.dir={tmp_path / 'moe'}",
            ]
        )
    )
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]
    routing = records[-2]["routing"]
    assert [r["layer"] for r in routing] == [1]
    assert routing[0]["tokens_max"] <= 8 * 64 * 2 * 0.5 * 1.25 + 1  # capacity bounds the load
    assert 0 < routing[0]["dropped"] < 1 and records[-2]["aux_loss"] > 0
    load = routing[0]["load"]  # each expert's share of the routed slots
    assert len(load) == 4 and sum(load) == pytest.approx(1.0)
    ratio = routing[0]["tokens_min"] / routing[0]["tokens_max"]
    assert min(load) / max(load) == pytest.approx(ratio) and min(load) <= 0.25 <= max(load)
    from safetensors.torch import load_file

    from moe_lab.store.checkpoint import latest_checkpoint

    state = load_file(latest_checkpoint(result.run_dir / "checkpoints") / "model.safetensors")
    assert state["layers.1.feed_forward.router.expert_bias"].abs().sum() > 0  # bias learned


@pytest.mark.parametrize("form", ["switch", "olmo", "megablocks", "mixtral"])
def test_the_sequence_granularity_is_the_mean_of_each_sequence_alone(form):
    """Each sequence routed by itself (micro-batch granularity on a batch of one) gives the
    per-sequence formula; the sequence granularity must be their mean."""
    moe = {"num_experts": 4, "top_k": 2, "expert_hidden": 24, "lbl": form, "z_loss_weight": 0.0}
    base = ModelConfig(dim=D, n_layers=3, n_heads=2, ffn_hidden=32, vocab_size=40,
                       init_std=0.3, moe=MoEConfig(**moe))  # fmt: skip
    per_seq = replace(base, moe=MoEConfig(**moe, lbl_granularity="sequence"))
    torch.manual_seed(0)
    model = build_model(per_seq)
    alone = build_model(base)
    alone.load_state_dict(model.state_dict())
    ids = torch.randint(0, 40, (5, 12))
    aux = model(ids).aux_loss
    expected = torch.stack([alone(ids[b : b + 1]).aux_loss for b in range(5)]).mean()
    torch.testing.assert_close(aux, expected)
    assert not torch.allclose(aux, alone(ids).aux_loss)  # the batch's own loss differs
    aux.backward()  # the per-sequence probabilities carry the gradient to the router
    assert model.layers[0].feed_forward.router.gate.weight.grad.abs().sum() > 0


def test_global_batch_loads_add_up_over_the_micro_batches_of_a_step():
    layer = _moe(lbl_granularity="global_batch").train()
    local = _moe()
    local.load_state_dict(layer.state_dict())
    local.train()
    x1, x2, x3 = (torch.randn(2, 10, D) for _ in range(3))
    first = layer(x1)[1].slot_counts_KE
    second = layer(x2)[1]
    alone = [local(x)[1] for x in (x1, x2)]
    torch.testing.assert_close(first, alone[0].slot_counts_KE)
    torch.testing.assert_close(second.slot_counts_KE, first + alone[1].slot_counts_KE)
    # f over both micro-batches, P of the second: E * sum_e f_e P_e with f of the first choices
    f = second.slot_counts_KE[0] / second.slot_counts_KE[0].sum()
    torch.testing.assert_close(
        load_balancing_loss([second], "switch"), 4 * (f * second.probs_E).sum()
    )
    layer.router.reset_step_counts()  # the loop's GlobalBatchLoads hook, after every step
    torch.testing.assert_close(layer(x3)[1].slot_counts_KE, local(x3)[1].slot_counts_KE)
    layer.eval()  # evaluation neither adds to nor reads the step's loads
    torch.testing.assert_close(layer(x1)[1].slot_counts_KE, local.eval()(x1)[1].slot_counts_KE)


def test_global_batch_loads_cover_exactly_one_step_in_training(tmp_path):
    """The logged load of each step is the step's two micro-batches, never earlier steps'."""
    import json

    from moe_lab.train.loop import train

    overrides = ["model.moe.num_experts=2", "model.moe.top_k=1",
                 "model.moe.lbl_granularity=global_batch", "train.grad_accum=2",
                 "train.batch_size=2", "train.seq_len=32", "train.max_steps=3",
                 "train.eval_batch_size=64",
                 "train.progress=false", f"run.dir={tmp_path / 'moe'}"]  # fmt: skip
    result = train(load_config(overrides=overrides))
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines if "routing" in x]
    assert len(records) == 3
    for record in records:
        for layer in record["routing"]:
            assert layer["tokens_min"] + layer["tokens_max"] == 2 * 2 * 32  # 2 micro-batches
