"""The subcommands that score or run a trained directory: eval, harness, knn, generate, routing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_lab.config import (
    ConfigError,
    load_config,
)
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.ensembles.directory import load_experts
from moe_lab.ensembles.ensemble import ExpertEnsemble, evaluate_experts
from moe_lab.ensembles.generation import generate_ensemble
from moe_lab.ensembles.merge import average
from moe_lab.ensembles.modes import evaluate_routing_modes
from moe_lab.ensembles.scoring import FixedRouting
from moe_lab.eval.evaluate import evaluate, validation_store
from moe_lab.eval.fewshot import evaluate_task, load_task
from moe_lab.eval.generation import generate
from moe_lab.eval.knnlm.run import (
    build_run_datastore,
    evaluate_run_knn,
    format_knn_report,
    opt_out_run,
)
from moe_lab.eval.routing_run import analyze_run
from moe_lab.eval.scoring import TransformerScorer
from moe_lab.families.ifc.experiment import evaluate_ifc
from moe_lab.families.loading import ensemble_routing, load_ifc_dir, load_scorer
from moe_lab.store.checkpoint import load_run, read_json, write_json

__all__ = ["cmd_eval", "cmd_generate", "cmd_harness", "cmd_knn", "cmd_routing"]


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a run (or a directory of experts, as an ensemble) per group; writes eval.json."""
    import torch

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
    if args.routing_modes and (single or ifc is not None):
        raise ConfigError("--routing-modes takes a directory of experts (C-BTM, BTM, X-ELM)")
    if ifc is not None:  # what one principal may run, evaluated per group
        cfg = load_config(Path(args.run_dir) / "config.yaml", args.overrides)
        report = evaluate_ifc(ifc, cfg, device)
        out = out.with_name(f"eval-{args.principal}.json")
        result = {"principal": args.principal, "permitted": ifc.permitted, "valid": report}
        write_json(out, result | fewshot)
        _print_report(report, out)
        return
    if args.routing_modes:  # each expert scores once; every mode mixes the same scores
        cfg = load_config(Path(args.run_dir) / "config.yaml", args.overrides)
        reports = evaluate_routing_modes(args.run_dir, cfg, args.routing_modes, device)
        out = out.with_name("eval-modes.json")
        write_json(out, {"modes": reports})
        print(f"{'routing':20s} {'loss':>8s} {'bpb':>7s} {'expert passes/token':>20s}")
        for mode, r in reports.items():
            passes = r["inference"]["expert_passes_per_token"]
            print(f"{mode:20s} {r['overall']['loss']:8.4f} {r['overall']['bits_per_byte']:7.4f} "
                  f"{passes:20.3f}")  # fmt: skip
        print(f"wrote {out}: per mode, the losses per group, routing and inference cost")
        return
    if not single:  # a directory of experts: an ensemble
        cfg = load_config(Path(args.run_dir) / "config.yaml", args.overrides)
        report = evaluate_experts(args.run_dir, cfg, device)
        write_json(out, report | fewshot)
        _print_report(report["valid"], out)
        return
    cfg, model, tokenizer = load_run(args.run_dir, args.overrides, device=device)
    fewshot = _fewshot(args, tasks, device, TransformerScorer(model, tokenizer))
    store = validation_store(cfg, tokenizer)
    result = evaluate(model, store, cfg.train.seq_len, cfg.train.eval_batch, device, progress=True)
    previous = read_json(out) if out.exists() else {}  # keeps step, tokens, FLOPs
    report = previous | {"valid": result} | fewshot
    if args.knn:  # the datastore of `moe-lab knn build`, tuned on half the documents
        seq_len, batch_size = cfg.train.seq_len, cfg.train.eval_batch
        report["knn"] = evaluate_run_knn(
            args.run_dir, model, tokenizer, store, seq_len, batch_size, device
        )
    else:
        report.pop("knn", None)  # from an earlier --knn run, maybe of another checkpoint
    write_json(out, report)
    _print_report(result, out)
    if args.knn:
        print(format_knn_report(report["knn"]), end="")


def _split_tasks(args: argparse.Namespace) -> list[str]:
    """``--tasks``, less the ``key=value`` overrides that followed it (they join the others)."""
    tasks = [t for t in args.tasks if "=" not in t or Path(t).exists()]
    args.overrides += [t for t in args.tasks if t not in tasks]
    return tasks


def _fewshot(args: argparse.Namespace, tasks: list[str], device: str, scorer=None) -> dict:
    """``{"fewshot": {task: result}}`` for ``tasks`` (moe_lab.eval.fewshot), with a printed table.

    ``scorer``: the model already loaded for the run, if any; else RUN_DIR is loaded for it.
    """
    if not tasks:
        return {}

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
        from moe_lab.interop.harness import MoeLabLM, evaluate_harness
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

    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes in argv arrive as lone surrogates
        raise ConfigError(
            f"--prompt is not valid UTF-8 text (an undecodable byte at character {e.start})"
        ) from None
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


def _load_ifc(args: argparse.Namespace, device: str):
    """What ``--principal`` may run of an IFC run directory (``moe-lab ifc``, ``train_ifc``), or
    None for any other directory."""
    return load_ifc_dir(args.run_dir, args.principal, args.policy, device)


def _generate_ensemble(args: argparse.Namespace, experts=None, tokenizer=None) -> None:
    """Generation from a train_experts directory, routed by ``ensemble.*`` (prefix or uniform, or
    one model of the averaged experts), or from given ``experts`` mixed uniformly."""
    import torch

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
            experts, routing = [average(experts)], FixedRouting.uniform(1)
    else:
        routing = FixedRouting.uniform(len(experts))

    prompt = [tokenizer.bos_id, *tokenizer.encode(args.prompt)]
    room = min(e.cfg.max_seq_len for e in experts) - len(prompt)
    if room <= 0:
        raise ConfigError(f"the prompt ({len(prompt)} tokens) fills model.max_seq_len")
    ensemble = ExpertEnsemble(experts, ens.mix)
    ids = generate_ensemble(
        ensemble,
        prompt,
        min(args.max_new_tokens, room),
        routing.last,
        args.temperature,
        args.top_p,
        tokenizer.eos_id,
        torch.Generator().manual_seed(args.seed),
    )
    print(args.prompt + tokenizer.decode(ids[len(prompt) :]))
    # what the generation cost, on stderr so the text alone can be piped
    ran = sum(ensemble.tokens_run)
    per_expert = ", ".join(f"expert {j}: {n}" for j, n in enumerate(ensemble.tokens_run) if n)
    print(
        f"{len(ids) - len(prompt)} new tokens; the experts processed {ran} tokens, prompt "
        f"included ({per_expert})",
        file=sys.stderr,
    )


def cmd_routing(args: argparse.Namespace) -> None:
    """What an MoE run's routers learned: usage per group, top tokens, co-activation, saturation."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = analyze_run(args.run_dir, args.out, args.max_tokens, device, args.overrides)
    E, layers = report["experts"], report["layers"]
    print(f"{report['tokens']:,d} validation tokens, {E} experts, top-{report['top_k']}")
    print("layer  usage entropy (bits)  dead experts  busiest expert")
    for layer, usage in zip(layers, report["usage"], strict=True):
        share = usage["share"]
        top = max(range(E), key=share.__getitem__)
        entropy = f"{usage['entropy_bits']:.2f} of {usage['max_entropy_bits']:.2f}"
        print(f"{layer:5d}  {entropy:20s}  {len(usage['dead']):12d}  {top} ({share[top]:.0%})")
    for field, values in report["groups"].items():
        tops = []
        for value, shares in sorted(values.items()):
            last = shares[-1]
            e = max(range(E), key=last.__getitem__)
            tops.append(f"{value}->{e} ({last[e]:.0%})")
        print(f"last MoE layer, busiest expert per {field}: {', '.join(tops)}")
    sat = report["saturation"]
    steps = zip(sat["steps"], sat["values"], strict=True)
    print("saturation (share of the final top-k already chosen): "
          + ", ".join(f"step {step}: {value:.2f}" for step, value in steps))  # fmt: skip
    out = Path(report["figures"][0]).parent
    print(f"wrote {out / 'routing.json'} and {len(report['figures'])} figures")
