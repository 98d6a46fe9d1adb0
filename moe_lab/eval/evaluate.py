"""Evaluation: loss, perplexity and bits per byte over whole held-out documents, overall and per
value of every group field (domain, language, ...).

Every document is scored once, in its own attention span (see
:func:`moe_lab.data.packing.eval_rows`): its text tokens and its EOS are predicted, from at most
``seq_len`` tokens of its own context. Bits per byte divide the summed negative log-likelihood (in
bits) by the UTF-8 bytes of the text, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_lab.data.documents import load_splits
from moe_lab.data.packing import IGNORE, TokenStore, build_store, cache_root, eval_rows
from moe_lab.eval.routing import RouterTap, count_routes, routing_report
from moe_lab.nn.losses import token_nll
from moe_lab.nn.model import Transformer

__all__ = ["document_nll", "evaluate", "summarize", "training_store", "validation_store"]


def training_store(cfg, tokenizer) -> TokenStore:
    """The (cached) token store of ``cfg``'s training documents, without group fields."""
    train, _, _ = load_splits(cfg)
    data = cfg.data
    return build_store(train, tokenizer, data.text_field, [], cache_root(data.cache_dir))


def validation_store(cfg, tokenizer) -> TokenStore:
    """The (cached) token store of ``cfg``'s validation documents, with its group fields."""
    _, valid, groups = load_splits(cfg, need_train=False)
    data = cfg.data
    return build_store(valid, tokenizer, data.text_field, groups, cache_root(data.cache_dir))


@torch.no_grad()
def document_nll(
    model: Transformer,
    store: TokenStore,
    seq_len: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
    routed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats) and number of scored tokens for every document: two ``[D]`` arrays.

    With ``max_batches`` only part of the documents is scored (the others keep zero tokens),
    taken in a fixed random order so that every group is represented, not just the first ones;
    a document the last batch cut short is left out whole, or its bytes would count in full.
    ``routed`` (``[D, L, E]``, an MoE model's) receives each document's (token, slot)
    assignments to each expert of each MoE layer.
    """
    was_training = model.training
    model.eval()
    nll = np.zeros(store.n_docs, dtype=np.float64)
    count = np.zeros(store.n_docs, dtype=np.int64)
    bar = tqdm(desc="evaluating", unit="batch", disable=None if progress else True, leave=False)
    order = None if max_batches is None else np.random.default_rng(0).permutation(store.n_docs)
    tap = RouterTap(model) if routed is not None else contextlib.nullcontext()
    with tap:
        for i, batch in enumerate(eval_rows(store, seq_len, batch_size, order)):
            if max_batches is not None and i >= max_batches:
                break
            ids, doc_ids = batch["input_ids"].to(device), batch["doc_ids"].to(device)
            targets = batch["targets"].to(device)
            h, _, _ = model.hidden_states(ids, doc_ids)  # logits in chunks, never all [B, T, V]
            losses = token_nll(h, model.head_weight, targets).flatten()
            scored = (targets.flatten() != IGNORE).cpu().numpy()
            docs = batch["doc_index"].flatten().numpy()[scored]
            np.add.at(nll, docs, losses.cpu().double().numpy()[scored])
            np.add.at(count, docs, 1)
            if routed is not None:  # the scored positions: real tokens, not padding
                count_routes(routed, [i.cpu().numpy()[scored] for i in tap.pop()], docs)
            bar.update()
    bar.close()
    partial = count < np.diff(store.offsets) - 1  # targets: every token after BOS
    nll[partial], count[partial] = 0.0, 0
    if routed is not None:
        routed[partial] = 0
    model.train(was_training)
    return nll, count


def _metrics(nll: float, tokens: int, n_bytes: int, docs: int) -> dict[str, float]:
    loss = nll / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "tokens": int(tokens),
        "bytes": int(n_bytes),
        "documents": int(docs),
    }


def summarize(nll: np.ndarray, count: np.ndarray, store: TokenStore) -> dict:
    """Overall and per-group metrics from per-document sums; only scored documents count."""
    scored = count > 0
    result = {
        "overall": _metrics(
            nll[scored].sum(), count.sum(), store.n_bytes[scored].sum(), scored.sum()
        )
    }
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for g, field in enumerate(store.group_fields):
        groups[field] = {}
        for code, value in enumerate(store.group_values[g]):
            m = scored & (store.group_codes[:, g] == code)
            if m.any():
                groups[field][value] = _metrics(
                    nll[m].sum(), count[m].sum(), store.n_bytes[m].sum(), m.sum()
                )
    result["groups"] = groups
    return result


def evaluate(
    model: Transformer,
    store: TokenStore,
    seq_len: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
) -> dict:
    """Loss, perplexity and bits per byte, overall and per group value (see :func:`summarize`);
    for an MoE model also ``routing``: each expert's share of the assignments per MoE layer,
    overall (with dead experts and the usage entropy) and per group value."""
    routers = RouterTap(model).routers
    routed = None
    if routers:
        routed = np.zeros((store.n_docs, len(routers), routers[0].cfg.num_experts), np.int64)
    nll, count = document_nll(
        model, store, seq_len, batch_size, device, max_batches, progress, routed
    )
    result = summarize(nll, count, store)
    if routed is not None:
        result["routing"] = routing_report(routed, store)
    return result
