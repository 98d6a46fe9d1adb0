"""The dense Llama baseline: one run of ``train.max_flops`` = the budget."""

from __future__ import annotations

from pathlib import Path

from moe_lab.accounting import estimate
from moe_lab.config import Config
from moe_lab.families.base import Family, VariantConfig, result
from moe_lab.store.checkpoint import read_json
from moe_lab.train.loop import train

__all__ = ["Dense"]


class Dense(Family):
    name = "dense"

    def run(self, cfg: Config, v: VariantConfig, budget: float, job: Path) -> dict:
        run = train(cfg)
        valid = read_json(run.run_dir / "eval.json")["valid"]
        cost = estimate(cfg.model, cfg.train.seq_len)
        return result(cost, [run.run_dir], valid, {"run_dir": str(run.run_dir)})
