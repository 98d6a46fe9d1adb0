"""Fused output projection + cross-entropy, computed in chunks of tokens.

The full ``[N, V]`` logits of a training batch never exist: each chunk's logits are made, turned
into the loss and, when gradients are needed, into ``d loss / d logits = (softmax - onehot) / n``
while still in cache, then contracted into the gradients of the hidden states and of the output
matrix (the approach of Liger-Kernel's FusedLinearCrossEntropy). Backward only scales the stored
gradients. The matmul FLOPs are the same as the unfused path; the memory traffic and the
allocation of logits-sized buffers are gone.

Shapes: N = tokens, D = model dim, V = vocabulary, C = tokens per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "fused_linear_cross_entropy", "token_nll"]

IGNORE_INDEX = -100


def _chunk_logits(h_CD: Tensor, w_VD: Tensor) -> Tensor:
    logits_CV = h_CD @ w_VD.t()
    return logits_CV.to(_acc_dtype(logits_CV))  # softmax math in at least fp32


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: Tensor, w_VD: Tensor, targets_N: Tensor, chunk: int) -> Tensor:
        valid_N = targets_N != IGNORE_INDEX
        acc = _acc_dtype(h_ND)
        n_valid = valid_N.sum().clamp(min=1).to(acc)
        grad_h_ND = torch.empty_like(h_ND)
        grad_w_VD = torch.zeros(w_VD.shape, dtype=acc, device=w_VD.device)
        total = torch.zeros((), dtype=acc, device=h_ND.device)
        for s in range(0, h_ND.shape[0], chunk):
            h_CD, valid_C = h_ND[s : s + chunk], valid_N[s : s + chunk]
            target_C1 = targets_N[s : s + chunk].clamp(min=0)[:, None]
            logits_CV = _chunk_logits(h_CD, w_VD)
            picked_C = logits_CV.gather(1, target_C1)[:, 0]
            # One exp pass serves both the loss (log-sum-exp) and its gradient (softmax):
            # in place, logits become d loss / d logits = (softmax - onehot) * valid / n_valid.
            max_C = logits_CV.amax(dim=-1)
            sum_C = logits_CV.sub_(max_C[:, None]).exp_().sum(dim=-1)
            total += ((max_C + sum_C.log() - picked_C) * valid_C).sum()
            weight_C = valid_C / n_valid
            logits_CV.mul_((weight_C / sum_C)[:, None])
            logits_CV.scatter_add_(1, target_C1, -weight_C[:, None].to(logits_CV.dtype))
            dlogits_CV = logits_CV.to(h_ND.dtype)
            grad_h_ND[s : s + chunk] = dlogits_CV @ w_VD.to(h_ND.dtype)
            if dlogits_CV.dtype == acc:  # accumulate in place: no [V, D] temporary per chunk
                grad_w_VD.addmm_(dlogits_CV.t(), h_CD)
            else:
                grad_w_VD += (dlogits_CV.t() @ h_CD).to(acc)
        ctx.save_for_backward(grad_h_ND, grad_w_VD.to(w_VD.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        return grad_h_ND * grad_out, grad_w_VD * grad_out, None, None


def token_nll(h: Tensor, weight: Tensor, targets: Tensor, chunk: int = 512) -> Tensor:
    """Per-token cross-entropy of ``h @ weight.T`` (0 where the target is -100), in chunks.

    Args:
        h: ``[..., D]`` final hidden states; weight: ``[V, D]``; targets: ``[...]``.

    Returns:
        ``[...]`` negative log-likelihoods in at least fp32, never holding more than ``chunk``
        tokens' logits at once.
    """
    h_ND, targets_N = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    out_N = torch.empty(len(targets_N), dtype=_acc_dtype(h_ND), device=h_ND.device)
    for s in range(0, h_ND.shape[0], chunk):
        out_N[s : s + chunk] = F.cross_entropy(
            _chunk_logits(h_ND[s : s + chunk], weight),
            targets_N[s : s + chunk],
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
    return out_N.view(targets.shape)


def _chunked_loss(h_ND: Tensor, w_VD: Tensor, targets_N: Tensor, chunk: int) -> Tensor:
    """The same mean loss without gradient bookkeeping (evaluation)."""
    valid_N = targets_N != IGNORE_INDEX
    return token_nll(h_ND, w_VD, targets_N, chunk).sum() / valid_N.sum().clamp(min=1)


def fused_linear_cross_entropy(
    h: Tensor, weight: Tensor, targets: Tensor, chunk: int = 512
) -> Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, never materialising all logits.

    Equals ``F.cross_entropy(F.linear(h, weight), targets, ignore_index=-100)`` in value and in the
    gradients of ``h`` and ``weight``.

    Args:
        h: ``[..., D]`` final hidden states.
        weight: ``[V, D]`` output projection (the embedding matrix when tied).
        targets: ``[...]`` token ids, ``-100`` where no loss is taken.
        chunk: tokens per chunk; 512 was fastest on a 2-core CPU at V = 8192 (bench/train_step.py).
    """
    h_ND, targets_N = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(h_ND, weight, targets_N, chunk)
    return _chunked_loss(h_ND, weight, targets_N, chunk)
