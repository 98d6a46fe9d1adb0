"""FlexOlmo's optional router tuning: after the merge, only the routers train, on public text.

Every expert routes and every other tensor is frozen (:class:`RouterScope`); the run is checked
to have changed nothing but the routers. The tuned routers depend on every expert they were tuned
with, so they are an artefact of their own whose provenance is the public domain and every owner:
:func:`~moe_lab.families.ifc.pipeline.load_ifc` uses them only for a principal permitted all of
those, and otherwise never opens them (the owners' own rows route instead).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from moe_lab.config import Config
from moe_lab.nn.experts.moe import MoE
from moe_lab.nn.model import Transformer
from moe_lab.store.checkpoint import (
    latest_checkpoint,
    read_safetensors,
    save_checkpoint,
    write_json,
    write_safetensors,
)
from moe_lab.train.hooks import StepHook
from moe_lab.train.loop import train

__all__ = ["RouterScope", "router_keys", "tune_routers"]


def router_keys(model: nn.Module) -> list[str]:
    """The state-dict names of every router's rows."""
    return [f"{name}.router.gate.weight" for name, m in model.named_modules() if isinstance(m, MoE)]


class RouterScope(StepHook):
    """Every expert routes; only the routers' rows train."""

    def apply(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            moe.router.restrict(None)
            moe.router.gate.weight.requires_grad_(True)

    def param_groups(self, weight_decay: float) -> None:
        return None  # the default groups, over the trainable router rows


def tune_routers(phase: Config, merged: Transformer, tokenizer_dir: Path) -> dict:
    """Tune ``merged``'s routers in the run ``phase`` describes (public data, its budget) and
    write ``router.safetensors`` and ``router.json`` next to that run; return the entry."""
    run_dir = Path(phase.run.dir)
    out = run_dir.parent
    init = out / "init"
    if latest_checkpoint(init / "checkpoints") is None:
        save_checkpoint(init / "checkpoints", 0, merged, None, {}, 1)
        shutil.copytree(tokenizer_dir, init / "tokenizer", dirs_exist_ok=True)
    result = train(replace(phase, train=replace(phase.train, init_from=str(init))),
                   scope=RouterScope())  # fmt: skip
    before = read_safetensors(latest_checkpoint(init / "checkpoints") / "model.safetensors")
    after = read_safetensors(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors")
    keys = set(router_keys(merged))
    for key, value in after.items():
        if key not in keys and not torch.equal(value, before[key]):
            raise RuntimeError(f"router tuning changed {key}: only the routers may train")
    write_safetensors(out / "router.safetensors", {k: after[k] for k in sorted(keys)})
    entry = {
        "weights": "router/router.safetensors",
        "steps": result.steps,
        "tokens": result.tokens,
        "flops": result.flops,
    }
    write_json(out / "router.json", entry)
    return entry
