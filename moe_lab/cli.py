"""``moe-lab <subcommand> ...``: a table of thin entry points.

Each subcommand takes ``key=value`` overrides of the config; ``train``, ``cluster``, ``info``,
``ifc``, ``xelm`` and ``compare`` (an experiment file) also take ``--config FILE``; ``eval`` and
``generate`` read the config saved in a run directory (``--principal``/``--policy`` for an
information-flow-control run, ``--lang`` for an X-ELM prompt); ``eval --tasks`` adds few-shot
multiple-choice accuracy (:mod:`moe_lab.fewshot`), ``eval --knn`` the kNN-LM of ``knn build``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from moe_lab.accounting import estimate
from moe_lab.config import Config, ConfigError, load_config, load_model_preset, model_presets
from moe_lab.data import DataError

__all__ = ["main"]


def _print_config(cfg: Config) -> None:
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="", flush=True)


def cmd_info(args: argparse.Namespace) -> None:
    """Print the resolved config and its parameter and FLOP counts."""
    cfg = load_config(args.config, args.overrides)
    _print_config(cfg)
    print("# accounting (moe_lab.accounting.estimate)")
    print(json.dumps(estimate(cfg.model, args.seq_len).as_dict(), indent=2))


def cmd_presets(args: argparse.Namespace) -> None:
    """List the model presets with their parameter counts."""
    for name in model_presets():
        print(f"{name:14s} {estimate(load_model_preset(name)).total_params:>16,d} params")


def cmd_train(args: argparse.Namespace) -> None:
    """Train a model (under torchrun too); without --config, a small model on the shipped corpus."""
    from moe_lab.train import train

    cfg = load_config(args.config, args.overrides)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    if main_rank:
        _print_config(cfg)
    result = train(cfg)
    if main_rank:
        print(
            f"trained {result.steps} steps, {result.tokens:,d} tokens, {result.flops:.3g} FLOPs; "
            f"valid loss {result.valid_loss:.4f}; run directory {result.run_dir}"
        )


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a run (or a directory of experts, as an ensemble) per group; writes eval.json."""
    import torch

    from moe_lab.checkpoint import load_run
    from moe_lab.evaluate import evaluate, validation_store
    from moe_lab.scoring import TransformerScorer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.run_dir) / "eval.json"
    single = not (Path(args.run_dir) / "manifest.json").exists()  # else experts, or an IFC run
    if args.knn and not single:
        raise ConfigError("eval --knn takes a single model's run, not an ensemble or IFC directory")
    tasks = _split_tasks(args)  # first: key=value after --tasks joins the overrides
    if single and args.lang:
        raise ConfigError(f"{args.run_dir} is a single model: --lang applies to X-ELM directories")
    fewshot = {} if single else _fewshot(args, tasks, device)  # {} without --tasks
    ifc = _load_ifc(args, device)
    if ifc is not None:  # what one principal may run, evaluated per group
        from moe_lab.ifc.experiment import evaluate_ifc

        cfg = load_config(Path(args.run_dir) / "config.yaml", args.overrides)
        report = evaluate_ifc(ifc, cfg, device)
        out = out.with_name(f"eval-{args.principal}.json")
        result = {"principal": args.principal, "permitted": ifc.permitted, "valid": report}
        out.write_text(json.dumps(result | fewshot, indent=2))
        _print_report(report, out)
        return
    if not single:  # a directory of experts: an ensemble
        from moe_lab.experts.ensemble import evaluate_experts

        cfg = load_config(Path(args.run_dir) / "config.yaml", args.overrides)
        report = evaluate_experts(args.run_dir, cfg, device)
        out.write_text(json.dumps(report | fewshot, indent=2))
        _print_report(report["valid"], out)
        return
    cfg, model, tokenizer = load_run(args.run_dir, args.overrides, device=device)
    fewshot = _fewshot(args, tasks, device, TransformerScorer(model, tokenizer))
    store = validation_store(cfg, tokenizer)
    result = evaluate(model, store, cfg.train.seq_len, cfg.train.eval_batch, device, progress=True)
    previous = json.loads(out.read_text()) if out.exists() else {}  # keeps step, tokens, FLOPs
    report = previous | {"valid": result} | fewshot
    if args.knn:  # the datastore of `moe-lab knn build`, tuned on half the documents
        from moe_lab.knnlm.run import evaluate_run_knn

        seq_len, batch_size = cfg.train.seq_len, cfg.train.eval_batch
        report["knn"] = evaluate_run_knn(
            args.run_dir, model, tokenizer, store, seq_len, batch_size, device
        )
    else:
        report.pop("knn", None)  # from an earlier --knn run, maybe of another checkpoint
    out.write_text(json.dumps(report, indent=2))
    _print_report(result, out)
    if args.knn:
        from moe_lab.knnlm.run import format_knn_report

        print(format_knn_report(report["knn"]), end="")


def _split_tasks(args: argparse.Namespace) -> list[str]:
    """``--tasks``, less the ``key=value`` overrides that followed it (they join the others)."""
    tasks = [t for t in args.tasks if "=" not in t or Path(t).exists()]
    args.overrides += [t for t in args.tasks if t not in tasks]
    return tasks


def _fewshot(args: argparse.Namespace, tasks: list[str], device: str, scorer=None) -> dict:
    """``{"fewshot": {task: result}}`` for ``tasks`` (moe_lab.fewshot), with a printed table.

    ``scorer``: the model already loaded for the run, if any; else RUN_DIR is loaded for it.
    """
    if not tasks:
        return {}
    from moe_lab.fewshot import evaluate_task, load_task
    from moe_lab.scoring import load_scorer

    if scorer is None:
        scorer = load_scorer(
            args.run_dir,
            args.overrides,
            principal=args.principal,
            policy=args.policy,
            lang=args.lang,
            device=device,
        )
    results = {}
    print(f"{'task':24s} {'group':24s} {'acc':>7s} {'acc_norm':>8s} {'items':>6s}")
    for task in tasks:
        name = Path(task).stem if Path(task).stem not in results else task
        records = load_task(task)[: args.limit]
        r = evaluate_task(scorer, records, args.shots, args.seed, progress=True)
        results[name] = {"file": str(task), **r}
        rows = [("overall", r["overall"])] + [
            (f"{field}={value}", m) for field, v in r["groups"].items() for value, m in v.items()
        ]
        for group, m in rows:
            print(f"{name:24s} {group:24s} {m['acc']:7.4f} {m['acc_norm']:8.4f} {m['n']:6d}")
        if r["truncated"]:
            print(f"{name}: {r['truncated']} of {r['n']} {args.shots}-shot prompts lost priming")
    return {"fewshot": results}


def _print_report(result: dict, out: Path) -> None:
    overall = result["overall"]
    print(f"{'group':24s} {'loss':>8s} {'ppl':>9s} {'bpb':>7s} {'tokens':>10s}")
    rows = [("overall", overall)] + [
        (f"{field}={value}", m)
        for field, values in result["groups"].items()
        for value, m in values.items()
    ]
    for name, m in rows:
        print(
            f"{name:24s} {m['loss']:8.4f} {m['perplexity']:9.2f} {m['bits_per_byte']:7.4f} "
            f"{m['tokens']:10,d}"
        )
    print(f"wrote {out}")


def cmd_harness(args: argparse.Namespace) -> None:
    """Run lm-evaluation-harness tasks on a run, experts or IFC directory (moe_lab[eval])."""
    import torch

    try:
        from moe_lab.harness import MoeLabLM, evaluate_harness
    except ImportError as e:  # lm-eval is an optional extra: one line saying how to install it
        raise ConfigError(str(e)) from e

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tasks = _split_tasks(args)
    lm = MoeLabLM(
        run_dir=args.run_dir,
        principal=args.principal,
        policy=args.policy,
        lang=args.lang,
        device=device,
        overrides=args.overrides,
    )
    result = evaluate_harness(lm, tasks, args.shots, args.limit, args.include_path)
    name = "harness.json" if args.principal is None else f"harness-{args.principal}.json"
    out = Path(args.run_dir) / name
    keep = ("results", "groups", "versions", "n-shot", "n-samples")
    out.write_text(json.dumps({k: result[k] for k in keep if k in result}, indent=2, default=str))
    from lm_eval.utils import make_table

    print(make_table(result))
    print(f"wrote {out}")


def cmd_knn(args: argparse.Namespace) -> None:
    """kNN-LM datastore of a run (RUN_DIR/knn): build it, or opt documents out of it."""
    import torch

    from moe_lab.knnlm.run import build_run_datastore, opt_out_run

    if args.action == "build":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ds = build_run_datastore(
            args.run_dir, args.index, args.key_type, args.dtype, args.overrides, device
        )
        print(f"wrote {ds.path}: {ds.n_entries:,d} entries, {ds.key_type} keys, {args.index} index")
        return
    where: dict[str, list[str]] = {}
    for item in args.where or []:
        field, sep, value = item.partition("=")
        if not sep or not field or not value:
            raise ConfigError(f"--where takes field=value, got {item!r}")
        where.setdefault(field, []).append(value)
    if not args.doc and not where:
        raise ConfigError("knn optout: name documents with --doc N or --where field=value")
    ds, removed = opt_out_run(args.run_dir, args.doc, where)
    print(f"removed {removed:,d} entries from {ds.path}; {ds.n_entries:,d} remain")


def cmd_generate(args: argparse.Namespace) -> None:
    """Continue a prompt with a run's latest checkpoint."""
    import torch

    from moe_lab.checkpoint import load_run
    from moe_lab.generation import generate

    ifc = _load_ifc(args, "cpu")
    if ifc is not None and ifc.model is None:  # ensemble form: the permitted experts, uniformly
        _generate_ensemble(args, ifc.experts, ifc.tokenizer)
        return
    if ifc is None and (Path(args.run_dir) / "manifest.json").exists():  # an expert ensemble
        _generate_ensemble(args)
        return
    if ifc is not None:
        cfg, model, tokenizer = ifc.cfg, ifc.model, ifc.tokenizer
    else:
        cfg, model, tokenizer = load_run(args.run_dir, args.overrides)
    prompt = [tokenizer.bos_id, *tokenizer.encode(args.prompt)]
    room = cfg.model.max_seq_len - len(prompt)
    if room <= 0:
        raise ConfigError(f"the prompt ({len(prompt)} tokens) fills model.max_seq_len")
    generator = torch.Generator().manual_seed(args.seed)
    out = generate(
        model,
        torch.tensor([prompt]),
        min(args.max_new_tokens, room),
        args.temperature,
        args.top_p,
        tokenizer.eos_id,
        generator,
    )
    print(args.prompt + tokenizer.decode(out[0, len(prompt) :].tolist()))


def cmd_convert(args: argparse.Namespace) -> None:
    """Write a sharded (FSDP2) checkpoint's weights as one model.safetensors file."""
    from moe_lab.checkpoint import convert_checkpoint

    print(f"wrote {convert_checkpoint(args.checkpoint)}")


def cmd_cluster(args: argparse.Namespace) -> None:
    """Discover domains: fit tf-idf + balanced k-means on the training documents."""
    from moe_lab.clustering.run import cluster_documents

    cfg = load_config(args.config, args.overrides)
    _print_config(cfg)
    report = cluster_documents(cfg)
    for c, (size, terms) in enumerate(zip(report["sizes"], report["top_terms"], strict=True)):
        print(f"cluster {c:3d}  {size:7,d} docs  {' '.join(terms)}")
    print(f"wrote {report['dir']}")


def _load_ifc(args: argparse.Namespace, device: str):
    """What ``--principal`` may run of an IFC run directory (``moe-lab ifc``, ``train_ifc``), or
    None for any other directory."""
    from moe_lab.scoring import load_ifc_dir

    return load_ifc_dir(args.run_dir, args.principal, args.policy, device)


def _generate_ensemble(args: argparse.Namespace, experts=None, tokenizer=None) -> None:
    """Generation from a train_experts directory, routed by ``ensemble.*`` (prefix or uniform, or
    one model of the averaged experts), or from given ``experts`` mixed uniformly."""
    import torch

    from moe_lab.btm import load_experts
    from moe_lab.experts.ensemble import ExpertEnsemble, generate_ensemble
    from moe_lab.scoring import FixedRouting, ensemble_routing
    from moe_lab.tokenizer import load_tokenizer

    cfg = load_config(Path(args.run_dir) / "config.yaml", args.overrides)
    ens = cfg.ensemble
    if experts is None:
        names, experts = load_experts(args.run_dir)
        tokenizer = load_tokenizer(Path(args.run_dir) / "experts" / names[0] / "run" / "tokenizer")
        routing = ensemble_routing(args.run_dir, cfg, names, tokenizer, args.lang)
        if args.lang is None and ens.routing == "oracle":
            raise ConfigError(
                "ensemble.routing=oracle routes by the whole document, which generation has not "
                "written yet: generate with ensemble.routing=prefix, uniform or average"
            )
        if args.lang is None and ens.routing == "average":
            from moe_lab.btm import average

            experts, routing = [average(experts)], FixedRouting.uniform(1)
    else:
        routing = FixedRouting.uniform(len(experts))

    prompt = [tokenizer.bos_id, *tokenizer.encode(args.prompt)]
    room = min(e.cfg.max_seq_len for e in experts) - len(prompt)
    if room <= 0:
        raise ConfigError(f"the prompt ({len(prompt)} tokens) fills model.max_seq_len")
    ids = generate_ensemble(
        ExpertEnsemble(experts, ens.mix),
        prompt,
        min(args.max_new_tokens, room),
        routing.last,
        args.temperature,
        args.top_p,
        tokenizer.eos_id,
        torch.Generator().manual_seed(args.seed),
    )
    print(args.prompt + tokenizer.decode(ids[len(prompt) :]))


def cmd_ifc(args: argparse.Namespace) -> None:
    """Information-flow control: train the IFC model and a dense baseline, report per domain."""
    import torch

    from moe_lab.ifc import AccessPolicy
    from moe_lab.ifc.experiment import run_ifc_experiment

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


def cmd_xelm(args: argparse.Namespace) -> None:
    """Cross-lingual experts: seed, language experts, added languages, dense baseline, report."""
    from moe_lab.xelm import run_xelm_experiment

    cfg = load_config(args.config, args.overrides)
    result = run_xelm_experiment(cfg)
    print(f"validation loss per {cfg.xelm.lang_field}; training FLOPs {result['train_flops']}")
    print(result["table"])
    print(f"wrote {Path(cfg.run.dir) / 'report.json'}")


def cmd_compare(args: argparse.Namespace) -> None:
    """Train every variant of an experiment to one FLOP budget; write results.json and report.md."""
    from moe_lab.compare import load_experiment, run_compare
    from moe_lab.config import PRESET_DIR

    path = args.config or PRESET_DIR.parent / "experiments" / "default.yaml"
    exp = load_experiment(path, args.overrides)
    run_compare(exp)
    out = Path(exp.dir)
    print((out / "report.md").read_text(), end="")
    print(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots")


def cmd_scaling(args: argparse.Namespace) -> None:
    """Fit L(C) = E + A C^-gamma per variant over results.json files from several budgets."""
    from moe_lab.compare import fit_scaling
    from moe_lab.plots import plot_scaling

    records = [r for path in args.results for r in json.loads(Path(path).read_text())]
    fits = {}
    for name in dict.fromkeys(r["name"] for r in records):
        try:
            fits[name] = fit_scaling([r for r in records if r["name"] == name])
        except ValueError as e:
            print(f"{name}: {e}")
            continue
        f = fits[name]
        print(
            f"{name}: L(C) = {f['E']:.4f} + {f['A']:.4g} * C^-{f['gamma']:.4f}  "
            f"(rmse {f['rmse']:.4f})"
        )
    if fits:
        out = plot_scaling(records, fits, Path(args.results[0]).parent / "scaling.png")
        print(f"wrote {out}")


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")


def _with_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by moe-lab train")
    p.add_argument("--principal", help="information-flow-control runs: who is asking")
    p.add_argument("--policy", help="information-flow-control runs: the access policy file")


def _generate_args(p: argparse.ArgumentParser) -> None:
    _with_run_dir(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--lang", help="X-ELM runs: the prompt's language (else the clusterer routes)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)


def _eval_args(p: argparse.ArgumentParser) -> None:
    _with_run_dir(p)
    p.add_argument(
        "--tasks", nargs="+", default=[], help="multiple-choice jsonl files, or corpus-cloze"
    )
    p.add_argument("--shots", type=int, default=0, help="priming examples per item")
    p.add_argument("--seed", type=int, default=0, help="picks the priming examples")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.add_argument("--lang", help="X-ELM runs: score the tasks with this language's expert")
    p.add_argument("--knn", action="store_true", help="also the kNN-LM of RUN_DIR/knn")


def _harness_args(p: argparse.ArgumentParser) -> None:
    _with_run_dir(p)
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names")
    p.add_argument("--shots", type=int, help="num_fewshot (default: each task's own)")
    p.add_argument("--limit", type=int, help="score only the first N documents of each task")
    p.add_argument("--include-path", help="a directory of task YAML files (local tasks)")
    p.add_argument("--lang", help="X-ELM runs: evaluate this language's expert")


def _knn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build", "optout"])
    p.add_argument("run_dir", help="a directory written by moe-lab train")
    p.add_argument("--index", choices=["flat", "ivfpq"], default="ivfpq", help="build")
    p.add_argument("--key-type", choices=["ffn_input", "final"], default="ffn_input")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--doc", type=int, action="append", help="optout: a training document index")
    p.add_argument("--where", action="append", help="optout: field=value, e.g. domain=legal")


def _info_args(p: argparse.ArgumentParser) -> None:
    _with_config(p)
    p.add_argument("--seq-len", type=int, default=None, help="context (default: max)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], Callable]] = {
    "train": (cmd_train, _with_config),
    "cluster": (cmd_cluster, _with_config),
    "eval": (cmd_eval, _eval_args),
    "generate": (cmd_generate, _generate_args),
    "harness": (cmd_harness, _harness_args),
    "info": (cmd_info, _info_args),
    "ifc": (cmd_ifc, _with_config),
    "xelm": (cmd_xelm, _with_config),
    "compare": (cmd_compare, _with_config),
    "scaling": (cmd_scaling, lambda p: p.add_argument("results", nargs="+", help="results.json")),
    "presets": (cmd_presets, lambda p: None),
    "convert": (
        cmd_convert,
        lambda p: p.add_argument("checkpoint", help="a checkpoint, or a run (its latest one)"),
    ),
    "knn": (cmd_knn, _knn_args),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=fn.__doc__.splitlines()[0])
        add_args(p)
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=llama3-8b")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]  # key=value overrides may also follow options
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[args.command][0](args)
    except (ConfigError, DataError, FileNotFoundError, PermissionError, ValueError) as e:
        print(f"moe-lab {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
