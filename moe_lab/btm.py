"""Branch-train-merge: train expert LMs branched from one seed, then combine them.

:func:`train_experts` branches a seed run into one expert per data shard (a cluster from
``moe-lab cluster``, a language, a domain...), each trained only on its shard as an independent,
idempotent and resumable job. The merging functions below combine the results:

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

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from moe_lab.checkpoint import write_json, write_safetensors
from moe_lab.config import ConfigError, MoEConfig
from moe_lab.model import Transformer, build_model

__all__ = [
    "average",
    "btx",
    "collect_manifest",
    "dare",
    "load_experts",
    "task_vectors",
    "train_experts",
    "ties",
]

BUDGET_SPLITS = ("equal", "proportional", "each")


Shard = list[str] | dict[str, list[str]]  # files, or group-field filters: {"lang": ["de"]}


def _shard_data(cfg, shard: Shard):
    """The template's data config narrowed to one expert's shard."""
    if isinstance(shard, dict):  # the template's documents whose group fields match
        from moe_lab.data import narrowed

        groups = sorted(set(cfg.data.group_fields or []) | set(shard))
        return replace(narrowed(cfg.data, shard), group_fields=groups)
    return replace(cfg.data, train_files=list(shard))


def _shard_size(cfg, shard: Shard) -> int:
    """Bytes of text a shard holds (a proxy for its tokens)."""
    if not isinstance(shard, dict):
        return sum(Path(f).stat().st_size for f in shard)
    from moe_lab.data import CORPUS_DIR, load_documents

    data = _shard_data(cfg, shard)
    files = list(data.train_files) or [str(CORPUS_DIR / "train.jsonl.gz")]
    docs = load_documents(files, data.text_field, data.group_fields, data.include)
    return sum(len(t.encode()) for t in docs[data.text_field])


def _split_budget(cfg, shards: dict[str, Shard], split: str) -> dict[str, dict]:
    """Each expert's share of the run's budget (``train.max_flops`` / ``max_tokens`` /
    ``max_steps``): equal, proportional to its shard's size in bytes (a proxy for tokens), or
    ``each``: the whole budget per expert (an expert added later, X-ELM's next round)."""
    if split not in BUDGET_SPLITS:
        raise ConfigError(f"budget split must be one of {BUDGET_SPLITS}, got {split!r}")
    if split == "each":
        shares = {name: 1.0 for name in shards}
    elif split == "equal":
        shares = {name: 1 / len(shards) for name in shards}
    else:  # measuring a shard can mean reading it: only when the split needs it
        sizes = {name: _shard_size(cfg, shard) for name, shard in shards.items()}
        shares = {name: size / sum(sizes.values()) for name, size in sizes.items()}
    return {name: cfg.train.budget_share(share) for name, share in shares.items()}


def collect_manifest(out_dir: str | Path) -> dict:
    """Rebuild ``manifest.json`` from the finished experts' ``expert.json`` files.

    Experts are listed in shard order (expert i serves cluster i), whatever order jobs finished in.
    """
    out = Path(out_dir)
    entries = [json.loads(p.read_text()) for p in (out / "experts").glob("*/expert.json")]
    entries.sort(key=lambda e: e["index"])
    manifest = {"experts": {e["name"]: e for e in entries}}
    write_json(out / "manifest.json", manifest)
    return manifest


def train_experts(
    cfg,
    shards: dict[str, Shard],
    out_dir: str | Path,
    seed: str | Path | None = None,
    budget_split: str = "equal",
    valid_files: dict[str, list[str]] | None = None,
    only: Sequence[str] | None = None,
) -> dict:
    """Branch ``seed`` into one expert per shard and train each on its shard only.

    The jobs are independent (no communication): here they run one after another; with ``only``
    each can run anywhere (see :func:`moe_lab.launch.submit_experts`). A finished expert (its
    ``expert.json`` exists, written last) is skipped; an interrupted one resumes from its
    checkpoint. Each job writes only its own files, then rebuilds ``manifest.json``.

    Args:
        cfg: the run template (:class:`~moe_lab.config.Config`); its budget is the total over all
            experts, split by ``budget_split``.
        shards: expert name -> the jsonl/parquet/text files it trains on, or a dict of group-field
            filters applied to the template's data (``{"lang": ["de"]}``: X-ELM's per-language
            experts), in expert order.
        out_dir: receives ``experts/<name>/run/`` (each expert's run directory),
            ``experts/<name>/expert.safetensors`` + ``expert.json`` and ``manifest.json``.
        seed: run directory or checkpoint to branch from (None: random init, as in BTM's
            from-scratch ablation).
        valid_files: expert name -> its validation files (default: the template's).
        only: train just these experts (the budget is still split over all shards).

    Returns:
        The manifest: per expert its files, seed, budget, steps, tokens, FLOPs, validation loss.
    """
    from safetensors.torch import load_file

    from moe_lab.checkpoint import latest_checkpoint
    from moe_lab.config import save_config
    from moe_lab.train import train

    out = Path(out_dir)
    if seed is None and cfg.data.tokenizer == "bpe":
        raise ConfigError(
            "experts trained from scratch with data.tokenizer=bpe would each fit their own BPE "
            "on their own shard, and their predictions could not be mixed: branch them from a "
            "seed run, or give data.tokenizer a tokenizer file (or byte)"
        )
    budgets = _split_budget(cfg, shards, budget_split)
    unknown = sorted(set(only or []) - set(shards))
    if unknown:
        raise ValueError(f"only names experts without a shard: {unknown}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.yaml").exists():
        save_config(cfg, out / "config.yaml")  # the template: `moe-lab eval` reads data from it
    for index, (name, shard) in enumerate(shards.items()):
        expert_dir = out / "experts" / name
        if (only is not None and name not in only) or (expert_dir / "expert.json").exists():
            continue  # someone else's job, or already finished
        train_cfg = replace(cfg.train, init_from=str(seed) if seed else None, **budgets[name])
        valid = list((valid_files or {}).get(name, cfg.data.valid_files))
        data_cfg = replace(_shard_data(cfg, shard), valid_files=valid)
        run_cfg = replace(cfg.run, dir=str(expert_dir / "run"), resume=True)
        result = train(replace(cfg, data=data_cfg, train=train_cfg, run=run_cfg))
        ckpt = latest_checkpoint(result.run_dir / "checkpoints")
        weights = expert_dir / "expert.safetensors"
        write_safetensors(weights, load_file(ckpt / "model.safetensors"))
        entry = {
            "name": name,
            "index": index,
            "data": dict(shard) if isinstance(shard, dict) else list(shard),
            "seed": str(seed) if seed else None,
            "budget_split": budget_split,
            "budget": {k: v for k, v in budgets[name].items() if v is not None},
            "steps": result.steps,
            "tokens": result.tokens,
            "flops": result.flops,
            "valid_loss": result.valid_loss,
            "weights": str(weights),
        }
        write_json(expert_dir / "expert.json", entry)  # the marker of a finished job
    return collect_manifest(out)


def load_experts(out_dir: str | Path, device="cpu") -> tuple[list[str], list[Transformer]]:
    """The finished experts of :func:`train_experts`, in manifest order, in eval mode."""
    from moe_lab.checkpoint import load_run

    out = Path(out_dir)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out} has no manifest.json: run train_experts first")
    names = list(json.loads((out / "manifest.json").read_text())["experts"])
    if not names:
        raise ConfigError(f"{out}/manifest.json lists no finished expert: train them first")
    runs = [load_run(out / "experts" / n / "run", device=device) for n in names]
    prints = [tokenizer.fingerprint() for _, _, tokenizer in runs]
    if len(set(prints)) > 1:
        other = next(n for n, p in zip(names, prints, strict=True) if p != prints[0])
        raise ConfigError(
            f"experts {names[0]!r} and {other!r} tokenize differently: their predictions "
            "cannot be mixed or merged (experts must share one tokenizer, e.g. a seed run's)"
        )
    return names, [model for _, model, _ in runs]


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
    **moe_fields,
) -> Transformer:
    """Branch-Train-MiX: one MoE layer per block whose expert e is expert model e's FFN.

    Attention, norms, embeddings and head are averaged; the router is ``N(0, router_std)`` and
    meant to be trained (the returned model is an ordinary moe_lab MoE checkpoint).

    Args:
        experts: dense models of one architecture (branched from one seed).
        top_k: experts per token (BTX: 2).
        moe_fields: further :class:`~moe_lab.config.MoEConfig` fields (lbl, capacity, ...).
    """
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
    return merged
