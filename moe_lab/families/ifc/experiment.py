"""The IFC experiment: an IFC model, the dense baseline at equal training FLOPs, per-domain losses.

:func:`run_ifc_experiment` trains the IFC model (:func:`~moe_lab.families.ifc.train_ifc`) and a
dense Llama of equal *active* compute (its FFN as wide as the experts a domain token runs: ``min(k,
2)`` of them) on all domains at the same total training FLOPs, then evaluates every principal of the
access policy per security domain. A principal without grants runs exactly the model trained on
public data only, so its column is the "public-only" reference the paper's gains are measured
against.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from moe_lab import accounting
from moe_lab.budget import Phase
from moe_lab.config import Config, ConfigError
from moe_lab.data.documents import narrowed
from moe_lab.data.policy import AccessPolicy
from moe_lab.ensembles.ensemble import ExpertEnsemble, ensemble_document_nll
from moe_lab.eval.evaluate import evaluate, validation_store
from moe_lab.families.base import Family, VariantConfig, result
from moe_lab.families.ifc.pipeline import (
    IFCModel,
    discover_domains,
    load_ifc,
    phase_models,
    train_ifc,
    with_domain_field,
)
from moe_lab.store.checkpoint import load_run, write_json
from moe_lab.train.loop import train

__all__ = ["IFC", "dense_baseline", "evaluate_ifc", "run_ifc_experiment"]


def evaluate_ifc(ifc: IFCModel, cfg: Config, device: str = "cpu") -> dict:
    """Loss, perplexity and bits per byte of what ``ifc``'s principal may run, per group value.

    ``form=ensemble`` mixes the permitted experts' probabilities with equal weights.
    """
    store = validation_store(with_domain_field(cfg), ifc.tokenizer)
    t = cfg.train
    if ifc.model is not None:
        return evaluate(ifc.model.to(device), store, t.seq_len, t.eval_batch, device)
    E = len(ifc.experts)
    ensemble = ExpertEnsemble([e.to(device) for e in ifc.experts])

    def uniform(d: int) -> np.ndarray:
        return np.full((store.offsets[d + 1] - store.offsets[d] - 1, E), 1.0 / E)

    return ensemble_document_nll(ensemble, store, uniform, t.seq_len, t.eval_batch, device)


def dense_baseline(cfg: Config, train_flops: float, out_dir: Path, domains: list[str]):
    """Train the dense model of equal active compute for ``train_flops`` on the IFC run's data:
    the public domain and the private ``domains`` together (other domains in the files stay out,
    as they do for the IFC model)."""
    moe = cfg.model.moe
    ffn = cfg.model.ffn_hidden if moe is None else min(moe.top_k, 2) * moe.expert_hidden
    model = replace(cfg.model, moe=None, ffn_hidden=ffn)
    budget = replace(cfg.train, max_steps=None, max_tokens=None, max_flops=train_flops)
    data = narrowed(cfg.data, {cfg.ifc.domain_field: [cfg.ifc.public, *domains]})
    run = replace(cfg.run, dir=str(out_dir), resume=True)
    return train(replace(cfg, model=model, train=budget, data=data, run=run))


def run_ifc_experiment(cfg: Config, policy: AccessPolicy, device: str = "cpu") -> dict:
    """Train, evaluate and report (``run.dir/report.json``; its ``table`` is Markdown)."""
    cfg = with_domain_field(cfg)
    out = Path(cfg.run.dir)
    if not policy.grants:
        raise ConfigError("the access policy has no principals")
    domains = discover_domains(cfg)
    for principal in policy.grants:  # fail closed before any training
        policy.permitted(principal, cfg.ifc.public, domains)
    manifest = train_ifc(cfg, out / "ifc")
    dense = dense_baseline(cfg, manifest["train_flops"], out / "dense", domains)
    field = cfg.ifc.domain_field
    _, model, tokenizer = load_run(dense.run_dir, device=device)
    store = validation_store(with_domain_field(cfg), tokenizer)
    columns = {
        "dense (all data)": evaluate(model, store, cfg.train.seq_len, cfg.train.eval_batch, device)
    }
    for principal in policy.grants:
        ifc = load_ifc(out / "ifc", policy, principal, device)
        columns[f"{principal}: {'+'.join(ifc.permitted)}"] = evaluate_ifc(ifc, cfg, device)
    rows = [manifest["public"], *manifest["domains"]]
    table = ["| domain | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for domain in rows:
        cells = [f"{c['groups'][field][domain]['loss']:.4f}" for c in columns.values()]
        table.append(f"| {domain} | " + " | ".join(cells) + " |")
    result = {
        "train_flops": {"ifc": manifest["train_flops"], "dense": dense.flops},
        "loss": {
            name: {d: c["groups"][field][d]["loss"] for d in rows} for name, c in columns.items()
        },
        "table": "\n".join(table),
    }
    write_json(out / "report.json", result)
    return result


class IFC(Family):
    """An information-flow-control model, evaluated by a principal who may use every domain."""

    name = "ifc"

    def uses_moe(self, cfg: Config) -> bool:
        return cfg.ifc.form == "moe"

    def phases(self, cfg: Config, v: VariantConfig) -> list[Phase]:
        n = len(discover_domains(with_domain_field(cfg)))
        _, public, domain = phase_models(cfg, n)
        share, tuning = cfg.ifc.public_share, cfg.ifc.router_tuning_share
        phases = [
            Phase(replace(cfg, model=public), share, 1),
            Phase(replace(cfg, model=domain), (1 - share - tuning) / n, n),
        ]
        if tuning > 0:  # the merged model, every expert routing
            phases.append(Phase(phase_models(cfg, n)[0], tuning, 1))
        return phases

    def run(self, cfg: Config, v: VariantConfig, budget: float, job: Path) -> dict:
        manifest = train_ifc(cfg, job / "ifc")
        policy = AccessPolicy({"all": frozenset(manifest["domains"])})
        model = load_ifc(job / "ifc", policy, "all")
        started = time.perf_counter()
        valid = evaluate_ifc(model, cfg)
        eval_s = time.perf_counter() - started
        runs = [job / "ifc" / "public" / "run"]
        runs += [job / "ifc" / "domains" / d / "run" for d in manifest["domains"]]
        if "router" in manifest:
            runs.append(job / "ifc" / "router" / "run")
        n = len(model.experts) if model.experts is not None else 1
        cost = accounting.ensemble(
            accounting.estimate(model.cfg.model, cfg.train.seq_len), experts=n, active=n
        )
        scorer = {"run_dir": str(job / "ifc"), "principal": "all", "policy": policy}
        return result(cost, runs, valid, scorer, eval_s)
