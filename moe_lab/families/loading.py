"""Any directory a family leaves (a training run, a directory of experts, an information-flow-
control run), loaded as a :class:`~moe_lab.eval.scoring.Scorer`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moe_lab.config import Config, ConfigError, load_config
from moe_lab.data.policy import AccessPolicy
from moe_lab.data.tokenizer import Tokenizer, load_tokenizer
from moe_lab.ensembles.directory import load_experts
from moe_lab.ensembles.ensemble import ExpertEnsemble, cluster_router
from moe_lab.ensembles.merge import average
from moe_lab.ensembles.scoring import EnsembleScorer, FixedRouting, PrefixRouting, Routing
from moe_lab.eval.scoring import Scorer, TransformerScorer
from moe_lab.families.ifc import load_ifc
from moe_lab.families.xelm import expert_for
from moe_lab.store.checkpoint import load_run, read_json

__all__ = ["ensemble_routing", "load_ifc_dir", "load_scorer"]


def ensemble_routing(
    run_dir: str | Path, cfg: Config, names: list[str], tokenizer: Tokenizer, lang: str | None
) -> Routing:
    """How a ``train_experts`` / X-ELM directory's experts are weighed for scoring and generation.

    ``lang``: the expert of that language, or of its most similar one (X-ELM). Otherwise
    ``cfg.ensemble``: prefix routing through ``ensemble.clusters_dir``'s clusterer, or uniform for
    ``routing=uniform`` and when no clusterer is configured.
    """
    E = len(names)
    if lang is not None:
        return FixedRouting(np.eye(E)[names.index(expert_for(run_dir, lang))])
    if cfg.ensemble.routing == "uniform" or cfg.ensemble.clusters_dir is None:
        return FixedRouting.uniform(E)
    return PrefixRouting(cluster_router(cfg.ensemble, E), tokenizer)


def load_ifc_dir(run_dir: str | Path, principal: str | None, policy, device: str = "cpu"):
    """What ``principal`` may run under ``policy`` (an :class:`~moe_lab.data.policy.AccessPolicy` or
    its file) of an information-flow-control directory (an :class:`~moe_lab.families.ifc.IFCModel`),
    or None for any other directory.

    Raises:
        ConfigError: an IFC directory without a principal and a policy.
    """
    manifest = Path(run_dir) / "manifest.json"
    if not manifest.is_file() or "domain_field" not in read_json(manifest):
        return None
    if principal is None or policy is None:
        raise ConfigError(
            f"{run_dir} is an information-flow-control run: pass --principal and --policy"
        )

    if not isinstance(policy, AccessPolicy):
        policy = AccessPolicy.load(policy)
    return load_ifc(run_dir, policy, principal, device)


def load_scorer(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    principal: str | None = None,
    policy=None,
    lang: str | None = None,
    device: str = "cpu",
    batch_size: int = 8,
) -> Scorer:
    """A scorer for any directory ``moe-lab eval`` takes.

    - an information-flow-control run (``manifest.json`` with a ``domain_field``): what
      ``principal`` may run under ``policy`` (required), loaded by
      :func:`~moe_lab.families.ifc.load_ifc`; the ensemble form mixes the permitted experts
      uniformly;
    - a directory of experts (``manifest.json``): routed per ``ensemble.*`` of its config.yaml
      (``average`` scores the parameter-averaged model), or by ``lang`` (X-ELM);
    - a training run (``config.yaml`` + checkpoints).

    Args:
        overrides: ``key=value`` changes to the saved config (e.g. ``ensemble.routing=uniform``).
        policy: an :class:`~moe_lab.data.policy.AccessPolicy` or the path of its file.
    """
    run = Path(run_dir)
    ifc = load_ifc_dir(run, principal, policy, device)
    if ifc is not None:
        if ifc.model is not None:
            return TransformerScorer(ifc.model.to(device), ifc.tokenizer, batch_size)
        routing = FixedRouting.uniform(len(ifc.experts))
        return EnsembleScorer(ExpertEnsemble(ifc.experts), routing, ifc.tokenizer, batch_size)
    if (run / "manifest.json").is_file():
        cfg = load_config(run / "config.yaml", overrides)
        names, experts = load_experts(run, device=device)
        tokenizer = load_tokenizer(run / "experts" / names[0] / "run" / "tokenizer")
        if lang is None and cfg.ensemble.routing == "average":
            return TransformerScorer(average(experts), tokenizer, batch_size)
        if lang is None and cfg.ensemble.routing == "oracle":
            raise ConfigError(
                "ensemble.routing=oracle routes by the whole document, answer included: "
                "score with ensemble.routing=prefix or uniform"
            )
        routing = ensemble_routing(run, cfg, names, tokenizer, lang)
        ensemble = ExpertEnsemble(experts, cfg.ensemble.mix)
        return EnsembleScorer(ensemble, routing, tokenizer, batch_size)
    if lang is not None:
        raise ConfigError(f"{run} is a single model: --lang applies to X-ELM expert directories")

    _, model, tokenizer = load_run(run, list(overrides), device=device)
    return TransformerScorer(model, tokenizer, batch_size)
