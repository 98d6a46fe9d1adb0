import pytest
import torch

from moe_lab import ModelConfig, build_model
from moe_lab.config import ConfigError
from moe_lab.ensembles.merge import average, btx, dare, task_vectors, ties

CFG = ModelConfig(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=67, ffn_hidden=48, init_std=0.1
)


def _models(n, cfg=CFG):
    return [build_model(cfg) for _ in range(n)]


def _state(model):
    return model.state_dict()


def _close(a, b, **kw):
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **kw)


def test_averaging_identical_experts_returns_the_same_model():
    model = build_model(CFG)
    copies = [build_model(CFG) for _ in range(3)]
    for c in copies:
        c.load_state_dict(model.state_dict())
    merged = average(copies)
    _close(_state(merged), _state(model))
    x = torch.randint(0, 67, (2, 9))
    torch.testing.assert_close(merged(x).logits, model(x).logits)


def test_weighted_average_closed_form():
    a, b = _models(2)
    merged = average([a, b], weights=[0.25, 0.75])
    _close(_state(merged), {k: 0.25 * v + 0.75 * _state(b)[k] for k, v in _state(a).items()})


def test_task_vectors_interpolate_between_base_and_experts():
    base, e1, e2 = _models(3)
    _close(_state(task_vectors(base, [e1], [0.0])), _state(base))
    _close(_state(task_vectors(base, [e1], [1.0])), _state(e1))
    merged = task_vectors(base, [e1, e2], [0.5, 2.0])
    expected = {
        k: v + 0.5 * (_state(e1)[k] - v) + 2.0 * (_state(e2)[k] - v)
        for k, v in _state(base).items()
    }
    _close(_state(merged), expected)
    _close(_state(task_vectors(base, [e1, e2])), _state(average([e1, e2])), atol=1e-6, rtol=1e-5)


def test_ties_keeps_only_large_agreeing_entries():
    base, e1, e2 = _models(3)
    with torch.no_grad():
        for p in base.parameters():
            p.zero_()
        for p1, p2 in zip(e1.parameters(), e2.parameters(), strict=True):
            p1.fill_(1.0)
            p2.fill_(3.0)
            p1.view(-1)[0], p2.view(-1)[0] = -5.0, 1.0  # disagreeing signs; e1's mass wins
    merged = ties(base, [e1, e2], density=1.0)
    for p in merged.parameters():
        assert p.view(-1)[0].item() == -5.0  # only the entry agreeing with the elected sign
        assert torch.all(p.view(-1)[1:] == 2.0)  # mean of the agreeing 1 and 3
    r1, r2 = _models(2)  # random task vectors: no magnitude ties
    trimmed = ties(base, [r1, r2], density=0.01)
    for p in trimmed.parameters():  # at most the union of both experts' top 1%
        if p.ndim == 2:  # norm weights are constant ones: every entry ties
            assert 0 < (p != 0).sum() <= 2 * max(1, round(0.01 * p.numel()))


def test_dare_without_dropping_is_task_arithmetic_and_is_seeded():
    base, e1, e2 = _models(3)
    _close(
        _state(dare(base, [e1, e2], drop=0.0)),
        _state(task_vectors(base, [e1, e2])),
        atol=1e-6,
        rtol=1e-5,
    )
    a, b = dare(base, [e1], drop=0.5, seed=3), dare(base, [e1], drop=0.5, seed=3)
    _close(_state(a), _state(b))
    delta = _state(a)["layers.0.attention.wq.weight"] - _state(base)["layers.0.attention.wq.weight"]
    full = _state(e1)["layers.0.attention.wq.weight"] - _state(base)["layers.0.attention.wq.weight"]
    kept = delta != 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(delta[kept], 2 * full[kept])  # kept entries rescaled by 1/(1-p)


def test_btx_from_one_expert_equals_that_expert():
    (expert,) = _models(1)
    merged = btx([expert], top_k=1)
    assert merged.cfg.moe.num_experts == 1
    x = torch.randint(0, 67, (2, 11))
    torch.testing.assert_close(merged(x).logits, expert(x).logits)


def test_btx_experts_are_the_source_ffns_and_the_rest_is_averaged():
    experts = _models(3)
    merged = btx(experts, top_k=2, lbl="switch")
    ffn = merged.layers[1].feed_forward
    assert ffn.cfg.num_experts == 3 and ffn.cfg.top_k == 2
    w1 = ffn.w1.view(3, 48, 32)
    for e, src in enumerate(experts):
        torch.testing.assert_close(w1[e], src.layers[1].feed_forward.w1.weight)
        torch.testing.assert_close(
            ffn.w2.view(3, 48, 32)[e], src.layers[1].feed_forward.w2.weight.t()
        )
    torch.testing.assert_close(
        merged.layers[0].attention.wq.weight, average(experts).layers[0].attention.wq.weight
    )
    assert ffn.router.gate.weight.requires_grad


def test_btx_routers_follow_its_seed_not_the_global_generator():
    experts = _models(2)

    def routers(seed):
        torch.rand(5)  # whatever the global generator did before
        merged = btx(experts, top_k=1, seed=seed)
        return [layer.feed_forward.router.gate.weight for layer in merged.layers]

    first, again, other = routers(1), routers(1), routers(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_incompatible_models_are_refused():
    other = build_model(ModelConfig(**{**CFG.__dict__, "vocab_size": 80}))
    with pytest.raises(ConfigError, match=r"model 1 differs from model 0 in model\.vocab_size"):
        average([build_model(CFG), other])
    with pytest.raises(ConfigError, match="every must be 1"):
        btx(_models(2), every=2)
    with pytest.raises(ConfigError, match="btx sets model.moe.num_experts itself"):
        btx(_models(2), num_experts=4)
    with pytest.raises(ValueError, match="2 weights for 3 models"):
        average(_models(3), weights=[0.5, 0.5])
