"""What the routers of a token-routed MoE learned, measured on held-out documents (OLMoE §5 and
FlexOlmo publish the same analyses): expert usage per domain or language, the tokens each expert
specialises in, which experts are chosen together, and how early in training the final routing
was already in place (router saturation).

Shapes: L = MoE layers, N = scored tokens, K = experts per token, E = experts, V = vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moe_lab.data.packing import TokenStore, eval_rows
from moe_lab.nn.routing import TopKRouter

__all__ = [
    "RouterTap",
    "TokenRoutes",
    "coactivation",
    "count_routes",
    "routed_per_document",
    "routing_report",
    "saturation",
    "token_routes",
    "top_tokens",
    "usage_by_group",
    "usage_summary",
]


class RouterTap:
    """While open, records the experts every :class:`TopKRouter` of ``model`` picks in each
    forward pass (a forward hook: the routing itself is untouched); :meth:`pop` hands over the
    last pass's ``[T, K]`` indices, one tensor per MoE layer in model order."""

    def __init__(self, model: nn.Module) -> None:
        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self._seen: list[torch.Tensor | None] = [None] * len(self.routers)
        self._handles = []

    def __enter__(self) -> RouterTap:
        for i, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i: int):
        def record(module, inputs, output) -> None:
            self._seen[i] = output[1].detach()  # (weights, indices, probs, logits)

        return record

    def pop(self) -> list[torch.Tensor]:
        seen, self._seen = self._seen, [None] * len(self.routers)
        if any(s is None for s in seen):
            raise RuntimeError("a router did not run in the last forward pass")
        return seen

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class TokenRoutes:
    """The experts each scored token went to, per MoE layer, with the token and its document."""

    indices: np.ndarray  # [L, N, K] int64
    tokens: np.ndarray  # [N] token ids
    docs: np.ndarray  # [N] document index in the token store
    num_experts: int

    @property
    def top_k(self) -> int:
        return self.indices.shape[2]


@torch.no_grad()
def token_routes(
    model: nn.Module,
    store: TokenStore,
    seq_len: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    max_tokens: int | None = None,
) -> TokenRoutes:
    """Route the documents of ``store`` (each in its own attention span, as in evaluation) and
    record every real token's experts. With ``max_tokens``, documents are taken in a fixed
    random order, so that every group is represented, until about that many tokens."""
    was_training = model.training
    model.eval()
    tap = RouterTap(model)
    if not tap.routers:
        raise ValueError("the model has no MoE layer: there is no routing to analyse")
    layers: list[list[np.ndarray]] = [[] for _ in tap.routers]
    tokens, docs, n = [], [], 0
    order = None if max_tokens is None else np.random.default_rng(0).permutation(store.n_docs)
    with tap:
        for batch in eval_rows(store, seq_len, batch_size, order):
            ids = batch["input_ids"].to(device)
            model.hidden_states(ids, batch["doc_ids"].to(device))
            real = (batch["doc_index"] >= 0).flatten().numpy()
            for chunks, idx in zip(layers, tap.pop(), strict=True):
                chunks.append(idx.cpu().numpy()[real])
            tokens.append(batch["input_ids"].flatten().numpy()[real])
            docs.append(batch["doc_index"].flatten().numpy()[real])
            n += int(real.sum())
            if max_tokens is not None and n >= max_tokens:
                break
    model.train(was_training)
    return TokenRoutes(
        indices=np.stack([np.concatenate(c) for c in layers]).astype(np.int64),
        tokens=np.concatenate(tokens),
        docs=np.concatenate(docs),
        num_experts=tap.routers[0].cfg.num_experts,
    )


def count_routes(routed: np.ndarray, indices, docs: np.ndarray) -> None:
    """Add to ``routed [D, L, E]`` the (token, slot) assignments of tokens whose documents are
    ``docs [N]`` and whose experts per MoE layer are ``indices`` (``[N, K]`` each)."""
    D, _, E = routed.shape
    for layer, idx in enumerate(indices):
        flat = np.repeat(docs, idx.shape[1]) * E + idx.reshape(-1)
        routed[:, layer] += np.bincount(flat, minlength=D * E).reshape(D, E)


def routed_per_document(routes: TokenRoutes, n_docs: int) -> np.ndarray:
    """``[D, L, E]``: the (token, slot) assignments of each document's tokens to each expert."""
    counts = np.zeros((n_docs, routes.indices.shape[0], routes.num_experts), dtype=np.int64)
    count_routes(counts, routes.indices, routes.docs)
    return counts


def _shares(counts: np.ndarray) -> np.ndarray:
    return counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)


def usage_by_group(routed: np.ndarray, store: TokenStore) -> dict[str, dict[str, list]]:
    """Per group field and value: each MoE layer's share of assignments per expert (rows sum to
    1), from :func:`routed_per_document`; values without scored tokens are left out."""
    out: dict[str, dict[str, list]] = {}
    for g, field in enumerate(store.group_fields):
        out[field] = {}
        for code, value in enumerate(store.group_values[g]):
            counts = routed[store.group_codes[:, g] == code].sum(axis=0)  # [L, E]
            if counts.sum():
                out[field][value] = _shares(counts).tolist()
    return out


def usage_summary(routed: np.ndarray, dead_below: float = 0.1) -> list[dict]:
    """Per MoE layer: each expert's share of all assignments, the experts that get less than
    ``dead_below`` of a uniform share ("dead"), and the entropy of the usage in bits (log2 E when
    perfectly balanced)."""
    out = []
    for counts in routed.sum(axis=0):  # [E] per layer
        share = _shares(counts)
        E = len(share)
        nonzero = share[share > 0]
        out.append(
            {
                "share": share.tolist(),
                "dead": [int(e) for e in np.flatnonzero(share < dead_below / E)],
                "entropy_bits": float(-(nonzero * np.log2(nonzero)).sum()),
                "max_entropy_bits": math.log2(E),
            }
        )
    return out


def routing_report(routed: np.ndarray, store: TokenStore) -> dict:
    """The ``routing`` section of an evaluation from ``routed [D, L, E]``: per layer the usage
    summary, and per group value each expert's share. Token routers count (token, slot)
    assignments per MoE layer; sequence-level routers (an expert ensemble's) the routing weight
    each expert got per predicted token, as one layer."""
    return {"layers": usage_summary(routed), "groups": usage_by_group(routed, store)}


def top_tokens(routes: TokenRoutes, tokenizer=None, n: int = 8, min_count: int = 5) -> list:
    """Vocabulary specialisation (OLMoE): per layer and expert, the tokens that go to it most
    reliably, by the share of their (token, slot) assignments that pick it; tokens seen fewer
    than ``min_count`` times are left out. Each entry is ``{"id", "text", "share", "count"}``
    (special tokens, which decode to nothing, as ``<id>``)."""
    E, K = routes.num_experts, routes.top_k
    vocab = int(routes.tokens.max()) + 1 if len(routes.tokens) else 1
    seen = np.bincount(routes.tokens, minlength=vocab) * K  # assignments per token
    tokens = np.repeat(routes.tokens, K)
    out = []
    for layer_indices in routes.indices:
        flat = tokens * E + layer_indices.reshape(-1)
        share_VE = np.bincount(flat, minlength=vocab * E).reshape(vocab, E) / np.maximum(
            seen[:, None], 1
        )
        share_VE[seen < min_count * K] = 0.0
        layer = []
        for e in range(E):
            best = [int(v) for v in np.argsort(-share_VE[:, e], kind="stable")[:n]]
            best = [v for v in best if share_VE[v, e] > 0]
            layer.append([
                {"id": v, "text": _text(tokenizer, v), "share": float(share_VE[v, e]),
                 "count": int(seen[v] // K)}
                for v in best
            ])  # fmt: skip
        out.append(layer)
    return out


def _text(tokenizer, token: int) -> str:
    text = tokenizer.decode([token]) if tokenizer is not None else ""
    return text or f"<{token}>"


def coactivation(routes: TokenRoutes) -> np.ndarray:
    """``[L, E, E]``: P(expert j is also chosen | expert i is chosen), per MoE layer (OLMoE's
    co-activation); the diagonal is 0. All zero with one expert per token."""
    L, E, K = routes.indices.shape[0], routes.num_experts, routes.top_k
    out = np.zeros((L, E, E))
    for layer, idx in enumerate(routes.indices):
        chosen = np.zeros((len(idx), E), dtype=np.int64)
        np.put_along_axis(chosen, idx, 1, axis=1)
        together = chosen.T @ chosen  # [E, E], diagonal = times chosen
        np.fill_diagonal(together, 0)
        out[layer] = together / np.maximum(chosen.sum(axis=0)[:, None], 1)
    return out if K > 1 else np.zeros((L, E, E))


def saturation(earlier: TokenRoutes, final: TokenRoutes) -> float:
    """OLMoE's router saturation: the mean over tokens and layers of the share of a token's
    final top-k experts that ``earlier`` already chose, |A ∩ B| / k. 1 for the final itself."""
    if earlier.indices.shape != final.indices.shape or not np.array_equal(
        earlier.tokens, final.tokens
    ):
        raise ValueError("saturation compares the routes of the same tokens")
    a, b = earlier.indices[..., :, None], final.indices[..., None, :]  # [L, N, K, 1], [L, N, 1, K]
    overlap = (a == b).any(axis=-2).sum(axis=-1)  # [L, N]: final experts also chosen earlier
    return float(overlap.mean() / final.top_k)
