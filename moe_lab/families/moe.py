"""The token-routed MoE: one run, like the dense family, of a model with MoE layers."""

from __future__ import annotations

from moe_lab.config import Config
from moe_lab.families.dense import Dense

__all__ = ["MoE"]


class MoE(Dense):
    name = "moe"

    def uses_moe(self, cfg: Config) -> bool:
        return True
