"""moe-lab: train and compare dense, MoE and expert-ensemble language models at matched compute.

Each subcommand takes ``key=value`` overrides of the config; ``train``, ``cluster``, ``info``,
``ifc``, ``xelm`` and ``compare`` (an experiment file) also take ``--config FILE``; ``eval`` and
``generate`` read the config saved in a run directory (``--principal``/``--policy`` for an
information-flow-control run, ``--lang`` for an X-ELM prompt); ``eval --tasks`` adds few-shot
multiple-choice accuracy (:mod:`moe_lab.eval.fewshot`), ``eval --knn`` the kNN-LM of ``knn build``.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from collections.abc import Callable

from moe_lab.cli.evaluation import cmd_eval, cmd_generate, cmd_harness, cmd_knn, cmd_routing
from moe_lab.cli.experiments import (
    cmd_cluster,
    cmd_compare,
    cmd_convert,
    cmd_export,
    cmd_flexolmo,
    cmd_ifc,
    cmd_import,
    cmd_info,
    cmd_presets,
    cmd_scaling,
    cmd_train,
    cmd_xelm,
)
from moe_lab.config import ConfigError
from moe_lab.config.reference import config_keys
from moe_lab.data.documents import DataError
from moe_lab.train.interrupt import TrainingInterrupted
from moe_lab.train.step import NonFiniteError

__all__ = ["COMMANDS", "main"]


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
    p.add_argument(
        "--routing-modes",
        nargs="+",
        metavar="MODE",
        help="experts: these routing modes from one scoring pass (prefix document uniform oracle "
        "posterior posterior-updating), into eval-modes.json; after any key=value overrides",
    )


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


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by moe-lab train")
    p.add_argument("--to", required=True, help="a new directory for the transformers model")


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="a transformers save_pretrained directory (safetensors)")
    p.add_argument("--to", required=True, help="a new directory for the moe_lab run")


def _routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by moe-lab train (an MoE model)")
    p.add_argument("--out", help="where routing.json and the figures go (default RUN_DIR/routing)")
    p.add_argument("--max-tokens", type=int, default=200_000, help="validation tokens to route")


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
    "flexolmo": (cmd_flexolmo, _with_config),
    "xelm": (cmd_xelm, _with_config),
    "compare": (cmd_compare, _with_config),
    "scaling": (cmd_scaling, lambda p: p.add_argument("results", nargs="+", help="results.json")),
    "presets": (cmd_presets, lambda p: None),
    "convert": (
        cmd_convert,
        lambda p: p.add_argument("checkpoint", help="a checkpoint, or a run (its latest one)"),
    ),
    "knn": (cmd_knn, _knn_args),
    "export": (cmd_export, _export_args),
    "import": (cmd_import, _import_args),
    "routing": (cmd_routing, _routing_args),
}


# An example per subcommand, shown by ``moe-lab <subcommand> --help``.
EXAMPLES = {
    "train": "moe-lab train model=cpu-small train.max_steps=500 run.dir=runs/mine",
    "cluster": "moe-lab cluster cluster.k=8 run.dir=runs/clusters",
    "eval": "moe-lab eval runs/mine --tasks corpus-cloze",
    "generate": 'moe-lab generate runs/mine --prompt "Once upon a time"',
    "harness": "moe-lab harness runs/mine --tasks hellaswag --limit 100",
    "info": "moe-lab info model=llama3-8b --seq-len 8192",
    "ifc": "moe-lab ifc --config configs/experiments/ifc.yaml",
    "flexolmo": "moe-lab flexolmo --config configs/experiments/ifc.yaml run.dir=runs/flexolmo",
    "xelm": "moe-lab xelm --config configs/experiments/xelm.yaml",
    "compare": "moe-lab compare --config configs/experiments/scaling.yaml 'seeds=[0,1,2]'",
    "scaling": "moe-lab scaling runs/a/results.json runs/b/results.json",
    "presets": "moe-lab presets",
    "convert": "moe-lab convert runs/fsdp",
    "knn": "moe-lab knn build runs/mine --index flat",
    "export": "moe-lab export runs/mine --to runs/mine-hf",
    "import": "moe-lab import ~/models/OLMoE-1B-7B-0924 --to runs/olmoe",
    "routing": "moe-lab routing runs/moe --max-tokens 50000",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (fn, add_args) in COMMANDS.items():
        summary = fn.__doc__.splitlines()[0]
        p = sub.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"example: {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_args(p)
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
        p.add_argument("-v", "--verbose", action="store_true", help="the full config, debug logs")
    return parser


def _configure_logging(verbose: bool) -> None:
    """moe_lab's own INFO lines (DEBUG with -v); other libraries' warnings and errors only."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("moe_lab").setLevel(logging.DEBUG if verbose else logging.INFO)


def _flag_hint(flag: str) -> str:
    """For ``--max-steps``: the config keys it may have meant (``train.max_steps=...``)."""
    name = flag.lstrip("-").split("=")[0].replace("-", "_")
    every = config_keys()
    keys = [k for k in every if k.rsplit(".", 1)[-1] == name]
    keys = keys or difflib.get_close_matches(name, every, n=2, cutoff=0.75)
    hint = " or ".join(f"{k}=..." for k in keys)
    return f" (config keys are key=value overrides: {hint}?)" if hint else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        parser.error(f"unknown subcommand {argv[0]!r}{hint} (moe-lab --help lists them)")
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        hint = _flag_hint(unknown[0]) if unknown[0].startswith("--") else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    args.overrides = [*args.overrides, *extra]  # key=value overrides may also follow options
    _configure_logging(args.verbose)
    try:
        COMMANDS[args.command][0](args)
    except (ConfigError, DataError, OSError, ValueError) as e:
        print(f"moe-lab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(
            f"moe-lab {args.command}: training stopped: {e}. The last good checkpoint is kept: "
            "rerun with run.resume=true (and, say, a lower train.lr) to continue from it.",
            file=sys.stderr,
        )
        return 3
    except KeyboardInterrupt as e:
        where = f" {e}" if isinstance(e, TrainingInterrupted) else ""
        print(
            f"\nmoe-lab {args.command}: interrupted{where}. Checkpoints are written atomically: "
            "rerun the same command with run.resume=true to continue a training run (compare "
            "resumes by itself).",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
