"""Router rows from data (FlexOlmo, Shi et al. 2025): an expert's row in each MoE layer's router
is the mean of what that layer's FFN reads, over a sample of the expert's documents.

A token's router logit for expert e is then its dot product with the average input of e's data,
so text like an expert's data goes to that expert before the router has seen a gradient: what
lets independently trained experts merge without joint training (FlexOlmo), and gives BTX's
router a start better than random.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from moe_lab.data.packing import TokenStore, eval_rows
from moe_lab.nn.experts.moe import MoE
from moe_lab.nn.model import Transformer

__all__ = ["mean_ffn_inputs", "set_router_row", "set_router_rows"]


@torch.no_grad()
def mean_ffn_inputs(
    model: Transformer,
    store: TokenStore,
    seq_len: int,
    max_docs: int | None = 256,
    batch_size: int = 64,
) -> list[Tensor]:
    """Per layer, the mean ``[D]`` (fp32) of its FFN's input over every token of ``store``'s
    documents (at most ``max_docs`` of them, evenly spaced through the store), each document in
    its own attention span as evaluation scores it."""
    if store.n_docs == 0:
        raise ValueError("router rows from data need at least one document")
    n = store.n_docs if max_docs is None else min(max_docs, store.n_docs)
    order = np.unique(np.linspace(0, store.n_docs - 1, n).round().astype(np.int64))
    device = next(model.parameters()).device
    sums = [torch.zeros(model.cfg.dim, dtype=torch.float64, device=device) for _ in model.layers]
    captured: list[Tensor] = []
    hooks = [
        layer.feed_forward.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        for layer in model.layers
    ]
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in eval_rows(store, seq_len, batch_size, order):
            real = (batch["doc_index"] >= 0).to(device)  # inputs of scored positions, no padding
            captured.clear()
            model.hidden_states(batch["input_ids"].to(device), batch["doc_ids"].to(device))
            for total, x in zip(sums, captured, strict=True):
                total += x[real].double().sum(0)
            count += int(real.sum())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [(total / count).float() for total in sums]


@torch.no_grad()
def set_router_row(model: Transformer, expert: int, means: Sequence[Tensor]) -> None:
    """Set row ``expert`` of every MoE layer's router to that layer's ``means[layer]``."""
    for layer, mean in zip(model.layers, means, strict=True):
        if isinstance(layer.feed_forward, MoE):
            gate = layer.feed_forward.router.gate.weight
            gate[expert] = mean.to(gate.dtype)


def set_router_rows(model: Transformer, rows: Sequence[Sequence[Tensor]]) -> None:
    """Set row ``e`` of every MoE layer's router to ``rows[e][layer]`` (one list of per-layer
    means per expert, as :func:`mean_ffn_inputs` returns)."""
    experts = model.cfg.moe.num_experts
    if len(rows) != experts:
        raise ValueError(f"{len(rows)} experts' rows for a router of {experts} experts")
    for e, means in enumerate(rows):
        set_router_row(model, e, means)
