"""Merging expert LMs into one model: averaging, task vectors, TIES, DARE and BTX.

* :func:`average` — weighted parameter averaging (BTM, Li et al. 2022).
* :func:`task_vectors` — ``θ0 + Σ λ_i (θ_i − θ0)`` (Ilharco et al. 2023; time vectors, Nylund et al.
  2023, use the same arithmetic to interpolate between time periods).
* :func:`ties` — trim each task vector to its largest-magnitude entries, elect a sign per parameter
  by total mass, average the agreeing entries (Yadav et al. 2023).
* :func:`dare` — drop each task-vector entry with probability p and rescale the rest by 1/(1 − p)
  (Yu et al. 2024), then add them up as task vectors.
* :func:`btx` — Branch-Train-MiX (Sukhbaatar et al. 2024): the experts' FFNs become the experts of
  one MoE layer per block, every other parameter is averaged, and a fresh router is trained.

Every function takes moe_lab models of one architecture and returns a new model; models whose
configs or parameter shapes differ are refused with the first difference named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from moe_lab.config import ConfigError, MoEConfig
from moe_lab.data.packing import TokenStore
from moe_lab.ensembles.router_init import mean_ffn_inputs, set_router_rows
from moe_lab.nn.model import Transformer, build_model

__all__ = ["average", "btx", "dare", "task_vectors", "ties"]


def _check_compatible(models: Sequence[Transformer]) -> None:
    if not models:
        raise ValueError("no models to merge")
    first = models[0].cfg
    for i, model in enumerate(models[1:], start=1):
        if model.cfg != first:
            diffs = [
                f for f in first.__dataclass_fields__ if getattr(first, f) != getattr(model.cfg, f)
            ]
            raise ConfigError(
                f"model {i} differs from model 0 in model.{diffs[0]} "
                f"({getattr(model.cfg, diffs[0])!r} vs {getattr(first, diffs[0])!r}); "
                "only models of one architecture and vocabulary can be merged"
            )


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} models")
    return [float(w) for w in weights]


def _new_like(model: Transformer, state: dict[str, Tensor]) -> Transformer:
    param = next(model.parameters())
    merged = build_model(model.cfg, device=param.device, dtype=param.dtype)
    merged.load_state_dict(state)
    return merged


@torch.no_grad()
def average(models: Sequence[Transformer], weights: Sequence[float] | None = None) -> Transformer:
    """``Σ_i w_i θ_i`` (uniform by default; weights are used as given, not renormalised)."""
    _check_compatible(models)
    w = _weights(len(models), weights)
    states = [m.state_dict() for m in models]
    merged = {
        k: sum(wi * s[k].double() for wi, s in zip(w, states, strict=True)).to(v.dtype)
        for k, v in states[0].items()
    }
    return _new_like(models[0], merged)


def _deltas(base: Transformer, experts: Sequence[Transformer]):
    _check_compatible([base, *experts])
    base_state = base.state_dict()
    return base_state, [{k: v - base_state[k] for k, v in e.state_dict().items()} for e in experts]


@torch.no_grad()
def task_vectors(
    base: Transformer, experts: Sequence[Transformer], scales: Sequence[float] | None = None
) -> Transformer:
    """``θ0 + Σ_i λ_i (θ_i − θ0)``; ``λ`` defaults to 1 / n (= parameter averaging)."""
    base_state, deltas = _deltas(base, experts)
    lam = _weights(len(experts), scales)
    merged = {
        k: v + sum(li * d[k] for li, d in zip(lam, deltas, strict=True))
        for k, v in base_state.items()
    }
    return _new_like(base, merged)


@torch.no_grad()
def ties(
    base: Transformer, experts: Sequence[Transformer], density: float = 0.2, scale: float = 1.0
) -> Transformer:
    """TIES merging: trim to the top ``density`` fraction of each task vector by magnitude, elect
    each parameter's sign by summed mass, average the entries that agree with it, scale by λ."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    base_state, deltas = _deltas(base, experts)
    merged = {}
    for k, v in base_state.items():
        stacked = torch.stack([d[k].double() for d in deltas])  # [n, *shape]
        flat = stacked.reshape(len(deltas), -1).abs()
        keep_n = max(1, round(density * flat.shape[1]))
        threshold = flat.kthvalue(flat.shape[1] - keep_n + 1, dim=1).values  # per expert
        trimmed = stacked * (stacked.abs() >= threshold.view(-1, *[1] * (stacked.ndim - 1)))
        sign = torch.sign(trimmed.sum(dim=0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        mean = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        merged[k] = (v.double() + scale * mean).to(v.dtype)
    return _new_like(base, merged)


@torch.no_grad()
def dare(
    base: Transformer,
    experts: Sequence[Transformer],
    drop: float = 0.9,
    scales: Sequence[float] | None = None,
    seed: int = 0,
) -> Transformer:
    """DARE: drop task-vector entries with probability ``drop``, rescale the rest by
    ``1 / (1 - drop)``, then merge as :func:`task_vectors` (seeded, so reproducible)."""
    if not 0 <= drop < 1:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    base_state, deltas = _deltas(base, experts)
    generator = torch.Generator().manual_seed(seed)
    lam = _weights(len(experts), scales)
    merged = {}
    for k, v in base_state.items():
        total = torch.zeros_like(v, dtype=torch.float64)
        for li, d in zip(lam, deltas, strict=True):
            keep = torch.rand(v.shape, generator=generator) >= drop
            total += li * d[k].double() * keep.to(v.device) / (1 - drop)
        merged[k] = (v.double() + total).to(v.dtype)
    return _new_like(base, merged)


@torch.no_grad()
def btx(
    experts: Sequence[Transformer],
    top_k: int = 2,
    router_std: float = 0.02,
    seed: int = 0,
    router_init: str = "random",
    router_data: Sequence[TokenStore] | None = None,
    seq_len: int = 256,
    **moe_fields,
) -> Transformer:
    """Branch-Train-MiX: one MoE layer per block whose expert e is expert model e's FFN.

    Attention, norms, embeddings and head are averaged; the router is meant to be trained (the
    returned model is an ordinary moe_lab MoE checkpoint) and starts ``N(0, router_std)``
    (``router_init="random"``, BTX) or from data (``"data"``, FlexOlmo): row e of each layer is
    the mean input of that layer's FFN in expert model e over ``router_data[e]``, e's documents
    (:func:`~moe_lab.ensembles.router_init.mean_ffn_inputs`, ``seq_len`` tokens per span).

    Args:
        experts: dense models of one architecture (branched from one seed).
        top_k: experts per token (BTX: 2).
        moe_fields: further :class:`~moe_lab.config.MoEConfig` fields (lbl, capacity, ...).
    """
    if router_init not in ("random", "data"):
        raise ConfigError(f"router_init must be random or data, got {router_init!r}")
    if router_init == "data" and (router_data is None or len(router_data) != len(experts)):
        raise ConfigError("router_init='data' needs router_data: one token store per expert")
    _check_compatible(experts)
    dense = experts[0].cfg
    if set_here := sorted({"num_experts", "top_k", "expert_hidden"} & set(moe_fields)):
        raise ConfigError(
            f"btx sets model.moe.{set_here[0]} itself (one expert per model, each as wide as "
            "its FFN; top_k is its own argument)"
        )
    if moe_fields.get("every", 1) != 1:
        raise ConfigError(
            "btx turns every block's FFN into an MoE layer: model.moe.every must be 1"
        )
    if dense.moe is not None:
        raise ConfigError("btx merges dense expert models; model 0 already has model.moe set")
    moe = MoEConfig(
        num_experts=len(experts),
        top_k=min(top_k, len(experts)),
        expert_hidden=dense.ffn_hidden,
        **moe_fields,
    )
    shared = average(experts).state_dict()
    param = next(experts[0].parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        merged = build_model(replace(dense, moe=moe), device=param.device, dtype=param.dtype)
        for layer in merged.layers:
            torch.nn.init.normal_(layer.feed_forward.router.gate.weight, std=router_std)
    state = merged.state_dict()
    for name, value in shared.items():
        if name in state and state[name].shape == value.shape:
            state[name].copy_(value)
    for i, layer in enumerate(merged.layers):
        ffn = layer.feed_forward
        sources = [e.layers[i].feed_forward for e in experts]
        ffn.w1.copy_(torch.cat([s.w1.weight for s in sources]))
        ffn.v1.copy_(torch.cat([s.w3.weight for s in sources]))
        ffn.w2.copy_(torch.cat([s.w2.weight.t() for s in sources]))
    if router_init == "data":
        rows = [mean_ffn_inputs(e, d, seq_len) for e, d in zip(experts, router_data, strict=True)]
        set_router_rows(merged, rows)
    return merged
