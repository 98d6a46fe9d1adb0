"""The experiment families ``moe-lab compare`` can run, by the name a variant gives. Adding a
family is one module implementing :class:`~moe_lab.families.base.Family` and one line here."""

from __future__ import annotations

from moe_lab.config import ConfigError
from moe_lab.families.base import Family
from moe_lab.families.cbtm import CBTM
from moe_lab.families.dense import Dense
from moe_lab.families.flexolmo import FlexOlmo
from moe_lab.families.ifc.experiment import IFC
from moe_lab.families.moe import MoE
from moe_lab.families.xelm import XELM

__all__ = ["FAMILIES", "get_family"]

FAMILIES: dict[str, Family] = {
    f.name: f for f in (Dense(), MoE(), CBTM(), XELM(), IFC(), FlexOlmo())
}


def get_family(name: str) -> Family:
    """The family called ``name``; a :class:`ConfigError` listing the known ones otherwise."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
