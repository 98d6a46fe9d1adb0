"""``moe-lab <subcommand> ...``: a table of thin entry points.

Each subcommand takes ``key=value`` overrides of the config; ``train``, ``cluster``, ``info``,
``ifc``, ``xelm`` and ``compare`` (an experiment file) also take ``--config FILE``; ``eval`` and
``generate`` read the config saved in a run directory (``--principal``/``--policy`` for an
information-flow-control run, ``--lang`` for an X-ELM prompt); ``eval --tasks`` adds few-shot
multiple-choice accuracy (:mod:`moe_lab.eval.fewshot`), ``eval --knn`` the kNN-LM of ``knn build``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from moe_lab.cli.evaluation import cmd_eval, cmd_generate, cmd_harness, cmd_knn
from moe_lab.cli.experiments import (
    cmd_cluster,
    cmd_compare,
    cmd_convert,
    cmd_ifc,
    cmd_info,
    cmd_presets,
    cmd_scaling,
    cmd_train,
    cmd_xelm,
)
from moe_lab.config import ConfigError
from moe_lab.data.documents import DataError

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
