import math

import pytest
import torch
import torch.nn.functional as F

from moe_lab import ModelConfig, build_model
from moe_lab.config import ConfigError, load_model_preset
from moe_lab.eval.generation import generate, sample_next
from moe_lab.nn.model import positions_in_documents
from moe_lab.nn.norm import RMSNorm

CFG = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=97,
    ffn_hidden=96,
    max_seq_len=64,
    init_std=0.1,
)


def test_output_contract_and_dense_aux_loss_is_exactly_zero():
    model = build_model(CFG)
    out = model(torch.randint(0, 97, (3, 10)))
    assert out.logits.shape == (3, 10, 97)
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() == 0.0


def test_init_statistics_and_no_bias():
    cfg = ModelConfig(dim=256, n_layers=8, n_heads=8, ffn_hidden=512, vocab_size=1000)
    model = build_model(cfg)
    assert all("bias" not in name for name, _ in model.named_parameters())
    std = lambda t: t.float().std().item()  # noqa: E731
    assert std(model.tok_embeddings.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.layers[0].attention.wq.weight) == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 8)
    assert std(model.layers[3].attention.wo.weight) == pytest.approx(residual, rel=0.05)
    assert std(model.layers[3].feed_forward.w2.weight) == pytest.approx(residual, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_rmsnorm_matches_closed_form_and_runs_in_fp32():
    norm = RMSNorm(8, eps=1e-6)
    norm.reset_parameters()
    x = torch.randn(4, 8, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x.float()), expected.float())
    y = norm.half()(torch.full((1, 8), 300.0, dtype=torch.float16))  # 300^2 overflows fp16
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, torch.ones(1, 8, dtype=torch.float16))


def test_rmsnorm_gradients_match_autograd_of_the_closed_form():
    """The hand-written backward: gradcheck in float64, and bf16 inputs against float64 autograd
    through the closed form, to bf16 resolution."""
    from moe_lab.nn.norm import _RMSNorm

    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-5), (x, w))

    xb = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    wb = torch.randn(16, requires_grad=True)
    grad = torch.randn(4, 16)
    _RMSNorm.apply(xb, wb, 1e-5).backward(grad)
    xr = xb.detach().double().requires_grad_()
    wr = wb.detach().double().requires_grad_()
    (wr * xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(grad.double())
    assert xb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.float32
    torch.testing.assert_close(xb.grad.double(), xr.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(wb.grad.double(), wr.grad, rtol=1e-2, atol=1e-2)


def test_rope_matches_the_rotate_half_formula_and_its_gradient():
    """The hand-written RoPE: forward equals the formula, gradcheck in float64, and the backward
    (a rotation by the negative angle) equals autograd through the formula on a strided input,
    as the attention passes it."""
    from moe_lab.nn.rope import apply_rope

    def formula(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    angle = torch.randn(2, 1, 5, 4, dtype=torch.float64)
    cos, sin = angle.cos(), angle.sin()
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: apply_rope(a, cos, sin), (x,))
    grad = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    out = apply_rope(x, cos, sin)
    (dx,) = torch.autograd.grad(out, x, grad)
    ref = formula(x, cos, sin)
    (dx_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dx, dx_ref)


def test_tied_embeddings_share_one_matrix():
    model = build_model(ModelConfig(tie_embeddings=True))
    assert model.output is None
    model.tok_embeddings.weight.data.zero_()
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.abs().max() == 0


def test_attention_is_causal():
    model = build_model(CFG)
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 97
    torch.testing.assert_close(model(x).logits[:, :8], model(y).logits[:, :8])
    assert not torch.allclose(model(x).logits[:, 8:], model(y).logits[:, 8:])


def test_meta_build_allocates_nothing_and_reset_reinitialises():
    model = build_model(load_model_preset("llama3-70b"), device="meta")
    assert all(p.is_meta for p in model.parameters())
    model = build_model(CFG)
    before = model.layers[0].attention.wq.weight.clone()
    model.reset_parameters()
    assert not torch.equal(before, model.layers[0].attention.wq.weight)


def test_bf16_parameters_keep_fp32_rope():
    model = build_model(CFG, dtype=torch.bfloat16)
    out = model(torch.randint(0, 97, (1, 8)))
    assert out.logits.dtype == torch.bfloat16
    assert model._inv_freq.dtype == torch.float32


def test_too_long_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"exceeds model\.max_seq_len \(64\)"):
        build_model(CFG)(torch.zeros(1, 65, dtype=torch.long))


def test_invalid_config_is_rejected_before_building():
    with pytest.raises(ConfigError, match=r"model\.n_heads \(4\) must be divisible"):
        build_model(ModelConfig(n_kv_heads=3))


# ---- document masking ----------------------------------------------------------------------------


def test_positions_restart_at_each_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_in_documents(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


def test_packed_document_logits_do_not_depend_on_the_document_before_it():
    model = build_model(CFG)
    doc_a = torch.randint(0, 97, (1, 10))
    alone = model(doc_a).logits
    for prefix_len in (1, 7, 20):
        prefix = torch.randint(0, 97, (1, prefix_len))
        packed = torch.cat([prefix, doc_a], dim=1)
        doc_ids = torch.cat([torch.zeros(1, prefix_len), torch.ones(1, 10)], dim=1).long()
        masked = model(packed, doc_ids=doc_ids).logits[:, prefix_len:]
        torch.testing.assert_close(masked, alone, atol=1e-5, rtol=1e-5)
        unmasked = model(packed).logits[:, prefix_len:]
        assert (unmasked - alone).abs().max() > 1e-3  # without masking the prefix leaks in


def test_document_masking_matches_a_naive_attention_loop():
    """Check the masked SDPA path against explicit per-document softmax attention."""
    model = build_model(
        ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=11, ffn_hidden=8, init_std=0.3)
    )
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    x = model.tok_embeddings(torch.randint(0, 11, (1, 7)))
    attn = model.layers[0].attention
    pos = positions_in_documents(doc_ids)
    cos, sin = model._rope(pos, x.dtype)
    mask = (torch.ones(7, 7, dtype=torch.bool).tril() & (doc_ids[0, :, None] == doc_ids[0]))[
        None, None
    ]
    got = attn(x, cos, sin, mask, None)
    q = attn.wq(x).view(1, 7, 2, 8).transpose(1, 2)
    k = attn.wk(x).view(1, 7, 2, 8).transpose(1, 2)
    v = attn.wv(x).view(1, 7, 2, 8).transpose(1, 2)
    rot = lambda t: torch.cat((-t[..., 4:], t[..., :4]), -1)  # noqa: E731 (rotate-half)
    c, s = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    q, k = q * c + rot(q) * s, k * c + rot(k) * s
    out = torch.zeros(1, 2, 7, 8)
    for i in range(7):
        allowed = [j for j in range(i + 1) if doc_ids[0, j] == doc_ids[0, i]]
        scores = q[:, :, i : i + 1] @ k[:, :, allowed].transpose(-1, -2) / math.sqrt(8)
        out[:, :, i] = (F.softmax(scores, -1) @ v[:, :, allowed])[:, :, 0]
    torch.testing.assert_close(got, attn.wo(out.transpose(1, 2).reshape(1, 7, 16)))


# ---- generation ----------------------------------------------------------------------------------


def test_kv_cache_greedy_generation_equals_full_recomputation():
    model = build_model(CFG)
    prompt = torch.randint(0, 97, (3, 5))
    cached = generate(model, prompt, max_new_tokens=30)
    recomputed = generate(model, prompt, max_new_tokens=30, use_cache=False)
    assert cached.shape == (3, 35)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[:, :5], prompt)


def test_kv_cache_logits_equal_full_forward():
    from moe_lab.nn.model import KVCache

    model = build_model(CFG)
    seq = torch.randint(0, 97, (2, 20))
    full = model(seq).logits
    cache = KVCache(CFG, 2, 20)
    parts = [model(seq[:, :7], cache=cache).logits]
    parts += [model(seq[:, t : t + 1], cache=cache).logits for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot take 2 sequences reaching 21 tokens"):
        model(seq[:, :1], cache=cache)  # full
    with pytest.raises(ValueError, match="for 3 sequences of 20 tokens cannot take 2"):
        model(seq[:, :4], cache=KVCache(CFG, 3, 20))


def test_sampled_generation_is_seeded_and_matches_without_cache():
    model = build_model(CFG)
    prompt = torch.randint(0, 97, (2, 4))
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(3)
        runs.append(
            generate(
                model, prompt, 25, temperature=0.9, top_p=0.8, generator=g, use_cache=use_cache
            )
        )
    assert torch.equal(*runs)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(300)}
    assert drawn == {0, 1}
    assert sample_next(logits, 0.0).item() == 0
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature >= 0"):
        sample_next(logits, float("nan"))


def test_generation_stops_at_eos_and_respects_max_seq_len():
    model = build_model(CFG)
    prompt = torch.randint(0, 97, (1, 3))
    first = generate(model, prompt, 1)[0, -1].item()
    out = generate(model, prompt, 10, eos_id=first)
    assert out.shape == (1, 4) and out[0, -1].item() == first
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        generate(model, prompt, 62)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, prompt, -1)


def test_token_ids_are_checked_at_the_model_boundary():
    """torch would raise a bare IndexError for an id outside the vocabulary, and score a target
    of -5 exactly as target 0; both are refused with the tensor named."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_hidden=64, vocab_size=50, max_seq_len=16)
    model = build_model(cfg)
    ids = torch.randint(0, 50, (2, 8))
    targets = ids.roll(-1, 1)
    model.loss(ids, targets.masked_fill(targets > 40, -100))  # in range, and -100: fine
    for bad, match in [
        (ids.masked_fill(ids == ids[0, 3], 50), r"input_ids holds 50, outside \[0, 50\)"),
        (ids - 60, r"input_ids holds -\d+, outside \[0, 50\)"),
        (ids.float(), "must be a \\[batch, tokens\\] integer tensor, got torch.float32"),
        (ids[0], r"integer tensor, got torch.int64 of shape \(8,\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            model(bad)
        with pytest.raises(ValueError, match=match):
            model.loss(bad, targets)
    bad_targets = targets.clone()
    bad_targets[1, 2] = -5
    with pytest.raises(ValueError, match=r"targets holds -5, outside \[0, 50\) or -100"):
        model.loss(ids, bad_targets)
    with pytest.raises(ValueError, match="targets shape"):
        model.loss(ids, targets[:, :4])
    with pytest.raises(ValueError, match="input_ids holds 77"):
        generate(model, torch.tensor([[1, 77]]), 2)
