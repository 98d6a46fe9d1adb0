"""The block-triangular CPU attention against scaled_dot_product_attention and gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from moe_lab.nn.causal_attention import BLOCK, BlockCausalAttention, causal_attention


def _sdpa(q, k, v):
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query and multi-head
def test_gradcheck_with_a_partial_last_block(kv_heads):
    q = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_heads, 7, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: BlockCausalAttention.apply(*t, 3), (q, k, v))
    torch.testing.assert_close(BlockCausalAttention.apply(q, k, v, 3), _sdpa(q, k, v))


def test_matches_sdpa_outputs_and_gradients_in_fp32():
    """Several blocks plus a partial one, GQA, and a strided v as the attention layer passes it."""
    torch.manual_seed(0)
    T = 2 * BLOCK + 5
    q = torch.randn(3, 8, T, 16, requires_grad=True)
    k = torch.randn(3, 2, T, 16, requires_grad=True)
    v = torch.randn(3, T, 2, 16).transpose(1, 2).requires_grad_()
    grad = torch.randn(3, 8, T, 16)
    out = causal_attention(q, k, v)
    ref = _sdpa(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(
        torch.autograd.grad(out, (q, k, v), grad),
        torch.autograd.grad(ref, (q, k, v), grad),
        strict=True,
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_no_query_attends_to_a_later_key():
    q, k, v = (torch.randn(1, 2, 2 * BLOCK, 8) for _ in range(3))
    before = causal_attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, BLOCK + 3 :] += 1.0
    v2[:, :, BLOCK + 3 :] -= 2.0
    after = causal_attention(q, k2, v2)
    torch.testing.assert_close(after[:, :, : BLOCK + 3], before[:, :, : BLOCK + 3])
    assert not torch.allclose(after[:, :, BLOCK + 3 :], before[:, :, BLOCK + 3 :])
