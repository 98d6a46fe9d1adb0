"""Branching: train expert LMs branched from one seed, each on its own shard of the data.

:func:`train_experts` branches a seed run into one expert per data shard (a cluster from
``moe-lab cluster``, a language, a domain...), each trained only on its shard as an independent,
idempotent and resumable job; :mod:`moe_lab.ensembles.merge` combines the results into one model,
:mod:`moe_lab.ensembles.ensemble` mixes their predictions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from moe_lab import budget
from moe_lab.config import ConfigError, save_config
from moe_lab.data.documents import CORPUS_DIR, load_documents, narrowed
from moe_lab.ensembles.directory import collect_manifest
from moe_lab.store.checkpoint import (
    latest_checkpoint,
    read_safetensors,
    write_json,
    write_safetensors,
)
from moe_lab.train.loop import train

__all__ = ["Shard", "expert_budgets", "train_experts"]


Shard = list[str] | dict[str, list[str]]  # files, or group-field filters: {"lang": ["de"]}


def _shard_data(cfg, shard: Shard):
    """The template's data config narrowed to one expert's shard."""
    if isinstance(shard, dict):  # the template's documents whose group fields match
        groups = sorted(set(cfg.data.group_fields or []) | set(shard))
        return replace(narrowed(cfg.data, shard), group_fields=groups)
    return replace(cfg.data, train_files=list(shard))


def _shard_size(cfg, shard: Shard) -> int:
    """Bytes of text a shard holds (a proxy for its tokens)."""
    if not isinstance(shard, dict):
        return sum(Path(f).stat().st_size for f in shard)

    data = _shard_data(cfg, shard)
    files = list(data.train_files) or [str(CORPUS_DIR / "train.jsonl.gz")]
    docs = load_documents(files, data.text_field, data.group_fields, data.include)
    return sum(len(t.encode()) for t in docs[data.text_field])


def expert_budgets(cfg, shards: dict[str, Shard], how: str) -> dict[str, dict]:
    """Each expert's share of the run's budget (:func:`moe_lab.budget.split`); ``proportional``
    splits by the bytes of text in each shard (a proxy for its tokens)."""
    sizes = None
    if how == "proportional":  # measuring a shard can mean reading it: only when the split needs it
        sizes = {name: _shard_size(cfg, shard) for name, shard in shards.items()}
    return budget.split(cfg.train, list(shards), how, sizes)


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
    each can run anywhere (see :func:`moe_lab.train.launch.submit_experts`). A finished expert (its
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
    out = Path(out_dir)
    if seed is None and cfg.data.tokenizer == "bpe":
        raise ConfigError(
            "experts trained from scratch with data.tokenizer=bpe would each fit their own BPE "
            "on their own shard, and their predictions could not be mixed: branch them from a "
            "seed run, or give data.tokenizer a tokenizer file (or byte)"
        )
    budgets = expert_budgets(cfg, shards, budget_split)
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
        write_safetensors(weights, read_safetensors(ckpt / "model.safetensors"))
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
            # None: the expert was trained with train.final_eval=false (scored as an ensemble)
            "valid_loss": None if math.isnan(result.valid_loss) else result.valid_loss,
            "weights": str(weights),
        }
        write_json(expert_dir / "expert.json", entry)  # the marker of a finished job
    return collect_manifest(out)
