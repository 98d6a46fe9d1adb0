"""``ifc.router_init=data``: router rows from each domain's own documents (FlexOlmo).

The public row of every router is the mean input of its MoE layer over public training
documents, set in the seed (public provenance only). Domain d's row is the same mean over d's
training documents, computed by the seed model inside d's own phase and written into d's starting
checkpoint, so it ships with d's expert and nothing shared ever depends on d's data.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from moe_lab.config import Config
from moe_lab.data.documents import narrowed
from moe_lab.data.packing import TokenStore
from moe_lab.data.tokenizer import Tokenizer, load_tokenizer
from moe_lab.ensembles.router_init import mean_ffn_inputs, set_router_row
from moe_lab.eval.evaluate import training_store
from moe_lab.families.ifc.scope import restrict_experts
from moe_lab.nn.model import Transformer, build_model
from moe_lab.store.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["domain_init", "domain_store", "set_public_rows"]


def domain_store(cfg: Config, domain: str, tokenizer: Tokenizer) -> TokenStore:
    """The training documents of ``domain`` alone, tokenized."""
    data = narrowed(cfg.data, {cfg.ifc.domain_field: [domain]})
    return training_store(replace(cfg, data=data), tokenizer)


def _set_row(model: Transformer, index: int, store: TokenStore, seq_len: int) -> None:
    """Row ``index`` of every router: the mean FFN input of the *public* model over ``store``
    (the routers restricted to the public expert meanwhile, which is then the whole FFN)."""
    restrict_experts(model, [0])
    means = mean_ffn_inputs(model, store, seq_len)
    restrict_experts(model, None)
    set_router_row(model, index, means)


def set_public_rows(seed: Transformer, cfg: Config, tokenizer: Tokenizer) -> None:
    """Row 0 of every router of ``seed`` from the public documents."""
    _set_row(seed, 0, domain_store(cfg, cfg.ifc.public, tokenizer), cfg.train.seq_len)


def domain_init(cfg: Config, seed_dir: Path, domain: str, index: int, out: Path) -> Path:
    """A checkpoint of the seed whose router row ``index`` comes from ``domain``'s documents:
    where ``domain``'s phase starts (written once, into the domain's own directory)."""
    if latest_checkpoint(out / "checkpoints") is not None:
        return out
    model = build_model(cfg.model)
    load_checkpoint(latest_checkpoint(seed_dir / "checkpoints"), model, restore_rng_state=False)
    tokenizer = load_tokenizer(seed_dir / "tokenizer")
    _set_row(model, index, domain_store(cfg, domain, tokenizer), cfg.train.seq_len)
    save_checkpoint(out / "checkpoints", 0, model, None, {}, 1)
    shutil.copytree(seed_dir / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    return out
