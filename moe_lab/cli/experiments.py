"""The subcommands that train or inspect: train, cluster, info, presets, convert, ifc, xelm,
compare, scaling."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from moe_lab.accounting import estimate
from moe_lab.config import (
    PRESET_DIR,
    Config,
    ConfigError,
    RunConfig,
    load_config,
    load_model_preset,
    model_presets,
)
from moe_lab.data.policy import AccessPolicy
from moe_lab.ensembles.clustering.run import cluster_documents
from moe_lab.families.flexolmo import run_flexolmo_experiment
from moe_lab.families.ifc.experiment import run_ifc_experiment
from moe_lab.families.xelm import run_xelm_experiment
from moe_lab.interop.export import export_run
from moe_lab.interop.hf_import import import_run
from moe_lab.store.checkpoint import convert_checkpoint, read_json
from moe_lab.train.loop import train

__all__ = [
    "print_config",
    "cmd_train",
    "cmd_cluster",
    "cmd_info",
    "cmd_presets",
    "cmd_convert",
    "cmd_ifc",
    "cmd_xelm",
    "cmd_compare",
    "cmd_scaling",
    "cmd_export",
    "cmd_flexolmo",
    "cmd_import",
]


def print_config(cfg: Config, verbose: bool = False) -> None:
    """The resolved config in full with ``-v``; else one line (it is saved in full in the run
    directory's config.yaml)."""
    if verbose:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="", flush=True)
        return
    m, t = cfg.model, cfg.train
    moe = "" if m.moe is None else f", {m.moe.num_experts} experts top-{m.moe.top_k}"
    budget = next(
        (f"{k}={getattr(t, k):.4g}" for k in ("max_flops", "max_tokens", "max_steps")
         if getattr(t, k) is not None), "no budget")  # fmt: skip
    print(
        f"model: {m.n_layers} layers x {m.dim}{moe}, {m.num_params():,d} params; "
        f"{budget}, batch {t.batch_size} x {t.seq_len}; run.dir {cfg.run.dir} "
        "(the full config: -v, or config.yaml there)",
        flush=True,
    )


def cmd_train(args: argparse.Namespace) -> None:
    """Train a model (under torchrun too); without --config, a small model on the shipped corpus."""
    cfg = load_config(args.config, args.overrides)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    if main_rank:
        print_config(cfg, args.verbose)
    result = train(cfg)
    if main_rank:
        print(
            f"trained {result.steps} steps, {result.tokens:,d} tokens, {result.flops:.3g} FLOPs; "
            f"valid loss {result.valid_loss:.4f}; run directory {result.run_dir}"
        )


def cmd_cluster(args: argparse.Namespace) -> None:
    """Discover domains: fit tf-idf + balanced k-means on the training documents."""
    cfg = load_config(args.config, args.overrides)
    if cfg.run.dir == RunConfig().dir:  # not train's default directory
        cfg = replace(cfg, run=replace(cfg.run, dir="runs/clusters"))
    print_config(cfg, args.verbose)
    report = cluster_documents(cfg)
    for c, (size, terms) in enumerate(zip(report["sizes"], report["top_terms"], strict=True)):
        print(f"cluster {c:3d}  {size:7,d} docs  {' '.join(terms)}")
    print(f"wrote {report['dir']}")


def cmd_info(args: argparse.Namespace) -> None:
    """Print the resolved config and its parameter and FLOP counts."""
    cfg = load_config(args.config, args.overrides)
    print_config(cfg, verbose=True)
    print("# accounting (moe_lab.accounting.estimate)")
    print(json.dumps(estimate(cfg.model, args.seq_len).as_dict(), indent=2))


def cmd_presets(args: argparse.Namespace) -> None:
    """List the model presets with their parameter counts."""
    names = model_presets()
    width = max(map(len, names))
    for name in names:
        est = estimate(load_model_preset(name))
        sparse = est.active_params < est.total_params
        active = f" {est.active_params:>16,d} active" if sparse else ""
        print(f"{name:{width}s} {est.total_params:>16,d} params{active}")


def cmd_convert(args: argparse.Namespace) -> None:
    """Write a sharded (FSDP2) checkpoint's weights as one model.safetensors file."""
    print(f"wrote {convert_checkpoint(args.checkpoint)}")


def cmd_ifc(args: argparse.Namespace) -> None:
    """Information-flow control: train the IFC model and a dense baseline, report per domain."""
    import torch

    cfg = load_config(args.config, args.overrides)
    if cfg.ifc.policy is None:
        raise ConfigError("ifc.policy: set the access policy file (principal -> domains)")
    policy = Path(cfg.ifc.policy)
    if not policy.is_absolute() and not policy.exists() and args.config:
        policy = Path(args.config).parent / policy  # relative to the experiment's file
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run_ifc_experiment(cfg, AccessPolicy.load(policy), device)
    print(f"validation loss per {cfg.ifc.domain_field}; training FLOPs {result['train_flops']}")
    print(result["table"])
    print(f"wrote {Path(cfg.run.dir) / 'report.json'}")


def cmd_flexolmo(args: argparse.Namespace) -> None:
    """FlexOlmo: a public model, one expert per data owner, merged; every owner opted out in
    turn, next to a dense baseline of equal training FLOPs."""
    import torch

    cfg = load_config(args.config, args.overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run_flexolmo_experiment(cfg, device)
    print(f"validation loss per {cfg.ifc.domain_field}; training FLOPs {result['train_flops']}")
    print(result["table"])
    print(f"wrote {Path(cfg.run.dir) / 'report.json'}")


def cmd_xelm(args: argparse.Namespace) -> None:
    """Cross-lingual experts: seed, language experts, added languages, dense baseline, report."""
    cfg = load_config(args.config, args.overrides)
    result = run_xelm_experiment(cfg)
    print(f"validation loss per {cfg.xelm.lang_field}; training FLOPs {result['train_flops']}")
    print(result["table"])
    print(f"wrote {Path(cfg.run.dir) / 'report.json'}")


def cmd_compare(args: argparse.Namespace) -> None:
    """Train every variant of an experiment to one FLOP budget; write results.json and report.md."""
    from moe_lab.compare import (  # imported here: scipy, ~0.6 s at every start
        load_experiment,
        run_compare,
    )

    path = args.config or PRESET_DIR.parent / "experiments" / "default.yaml"
    exp = load_experiment(path, args.overrides)
    run_compare(exp)
    out = Path(exp.dir)
    print((out / "report.md").read_text(), end="")
    print(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots")


def cmd_scaling(args: argparse.Namespace) -> None:
    """Fit L(C) = E + A C^-gamma per variant over results.json files from several budgets, and
    L(N, D) per family whose variants come in several sizes."""
    from moe_lab.compare.plots import plot_scaling
    from moe_lab.compare.scaling import scaling_study
    from moe_lab.compare.scaling_nd import nd_study

    records = [r for path in args.results for r in read_json(Path(path))]
    baseline = records[0]["name"]
    study = scaling_study(records, baseline)
    for name in dict.fromkeys(r["name"] for r in records):
        if name not in study:
            print(f"{name}: a scaling fit needs results at 3 or more different budgets")
            continue
        f, p = study[name]["fit"], study[name]["predicted"]["10x"]
        print(
            f"{name}: L(C) = {f['E']:.4f} + {f['A']:.4g} * C^-{f['gamma']:.4f}  "
            f"(rmse {f['rmse']:.4f}); at {p['flops']:.3g} FLOPs: {p['loss']:.4f} "
            f"[{p['interval'][0]:.4f}, {p['interval'][1]:.4f}]"
        )
        cross = study[name].get("crossover")
        if cross is not None:
            at = "none" if cross["flops"] is None else f"{cross['flops']:.3g} FLOPs"
            print(f"  crosses {baseline}: {at} (up to {cross['searched'][1]:.3g})")
    for family, s in nd_study(records).items():
        f, o = s["fit"], s["optimal"]["1x"]
        print(
            f"{family}: L(N, D) = {f['E']:.4f} + {f['A']:.4g} N^-{f['alpha']:.3f} + "
            f"{f['B']:.4g} D^-{f['beta']:.3f} (rmse {f['rmse']:.4f}); compute-optimal at "
            f"{o['flops']:.3g} FLOPs: N = {o['params']:.3g}, D = {o['tokens']:.3g}"
        )
    if study:
        out = plot_scaling(records, study, Path(args.results[0]).parent / "scaling.png", baseline)
        print(f"wrote {out}")


def cmd_export(args: argparse.Namespace) -> None:
    """Export a run as a transformers directory: weights, config and tokenizer."""
    out = export_run(args.run_dir, args.to)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained")


def cmd_import(args: argparse.Namespace) -> None:
    """Import a transformers directory as a run: config, step-0 checkpoint and tokenizer."""
    out = import_run(args.hf_dir, args.to)
    print(
        f"wrote {out}: moe-lab eval/generate/routing {out}, or train from it with "
        f"model={out}/model.yaml train.init_from={out}"
    )
