"""FlexOlmo (Shi et al. 2025): data owners' experts merged into one MoE, with opt-out.

Each data owner trains an expert on its own closed documents, independently, against a frozen
public model; the experts merge into one MoE whose router rows are embeddings of the owners' data;
an owner opts out at inference by removing its expert, with no retraining.

That is the information-flow-control pipeline (:mod:`moe_lab.families.ifc`) with two settings:

1. a **public model** is trained on public documents (attention, embeddings, norms, the public
   expert and its router row);
2. per owner, in its own phase (a separate resumable run, which may run elsewhere): the 2-expert
   MoE of the frozen public expert and the owner's copy of it, only the latter's rows and router
   row trainable (:class:`~moe_lab.families.ifc.scope.ExpertScope`), on the owner's documents
   alone (``ifc.mix_public=false``); its router row starts as the mean input of each MoE layer
   over the owner's documents (``ifc.router_init=data``);
3. the **merge** loads every expert's rows into one MoE (:func:`~moe_lab.families.ifc.load_ifc`)
   whose routers put the public expert in every token's top k (``model.moe.always_selected``,
   the role of the paper's router bias) and pick the rest by score;
4. **opt-out**: a principal granted every owner but one runs the others, through ``restrict``;
   every other expert and router row is bit-identical (each was trained alone).
   :func:`merged_model` builds the MoE of chosen owners alone (for release, or
   ``FlexOlmoForCausalLM``).

``ifc.router_tuning_share > 0`` adds FlexOlmo's optional router tuning: after the merge, only the
routers train on public text, for that share of the budget
(:mod:`~moe_lab.families.ifc.router_tuning`); the tuned routers serve only principals permitted
every owner.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from moe_lab.config import Config
from moe_lab.data.policy import AccessPolicy
from moe_lab.families.base import VariantConfig
from moe_lab.families.ifc.experiment import IFC, run_ifc_experiment
from moe_lab.families.ifc.pipeline import discover_domains, load_ifc, with_domain_field
from moe_lab.families.ifc.scope import key_rows
from moe_lab.nn.model import Transformer, build_model
from moe_lab.store.checkpoint import read_json
from moe_lab.store.weights import load_weights

__all__ = [
    "FlexOlmo",
    "flexolmo_config",
    "merged_model",
    "opt_out_policy",
    "run_flexolmo_experiment",
]

ALL = "all owners"


def flexolmo_config(cfg: Config) -> Config:
    """``cfg`` with FlexOlmo's settings of the IFC pipeline (module docstring)."""
    ifc = replace(cfg.ifc, form="moe", mix_public=False, router_init="data")
    model = cfg.model
    if model.moe is not None:  # the public expert in every token's top k
        model = replace(model, moe=replace(model.moe, always_selected=[0]))
    return replace(cfg, ifc=ifc, model=model)


def opt_out_policy(owners: list[str]) -> AccessPolicy:
    """Principals ``all owners`` and ``without <owner>`` for each owner: FlexOlmo's opt-out
    table, each owner's data evaluated with and without its expert."""
    grants = {ALL: owners} | {f"without {o}": [d for d in owners if d != o] for o in owners}
    return AccessPolicy.from_dict({"principals": grants})


def merged_model(
    out_dir: str | Path, owners: list[str] | None = None, public_always_selected: bool = True
) -> Transformer:
    """The MoE of the public expert and ``owners`` (default: every owner) alone, as if merged
    without the others: their weights are never read and the model has ``1 + len(owners)``
    experts. With FlexOlmo's backbone (``model.qk_norm=projection``, ``norm_position=post``) and
    ``public_always_selected=False`` it converts to ``FlexOlmoForCausalLM``
    (:func:`moe_lab.interop.hf.to_hf`), whose router picks every expert by score."""
    manifest = read_json(Path(out_dir) / "manifest.json")
    owners = list(manifest["domains"]) if owners is None else list(owners)
    policy = AccessPolicy.from_dict({"principals": {"export": owners}})
    restricted = load_ifc(out_dir, policy, "export").model
    keep = [0] + [manifest["experts"][o]["index"] for o in owners]
    moe = restricted.cfg.moe
    always = [0] if public_always_selected else []
    small = replace(moe, num_experts=len(keep), always_selected=always)
    model = build_model(replace(restricted.cfg, moe=small), device="meta")
    state = {}
    for key, value in restricted.state_dict().items():
        if key.endswith(("feed_forward.w1", "feed_forward.v1", "feed_forward.w2",
                         "router.gate.weight")):  # fmt: skip
            value = torch.cat([value[key_rows(restricted, key, e)] for e in keep])
        elif key.endswith("router.expert_bias"):
            value = value[keep]
        state[key] = value
    load_weights(model, state, source=str(out_dir))
    return model.eval()


def run_flexolmo_experiment(cfg: Config, device: str = "cpu") -> dict:
    """Train the FlexOlmo model and the dense baseline of equal training FLOPs, and evaluate
    every opt-out per domain (``run.dir/report.json``)."""
    cfg = flexolmo_config(with_domain_field(cfg))
    return run_ifc_experiment(cfg, opt_out_policy(discover_domains(cfg)), device)


class FlexOlmo(IFC):
    """The FlexOlmo model with every owner opted in, for ``moe-lab compare``."""

    name = "flexolmo"

    def uses_moe(self, cfg: Config) -> bool:
        return True

    def phases(self, cfg: Config, v: VariantConfig):
        return super().phases(flexolmo_config(cfg), v)

    def run(self, cfg: Config, v: VariantConfig, budget: float, job: Path) -> dict:
        return super().run(flexolmo_config(cfg), v, budget, job)
