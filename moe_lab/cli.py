"""``moe-lab <subcommand> [--config FILE] [key=value ...]``: a table of thin entry points."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from omegaconf import OmegaConf

from moe_lab.accounting import estimate
from moe_lab.config import Config, ConfigError, load_config, model_presets

__all__ = ["main"]


def _resolved(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.overrides)
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
    return cfg


def cmd_info(args: argparse.Namespace) -> None:
    """Print the resolved config and its parameter and FLOP counts."""
    cfg = _resolved(args)
    counts = estimate(cfg.model, args.seq_len)
    print("# accounting (moe_lab.accounting.estimate)")
    print(json.dumps(counts.as_dict(), indent=2))


def cmd_presets(args: argparse.Namespace) -> None:
    """List the model presets with their parameter counts."""
    from moe_lab.config import load_model_preset

    for name in model_presets():
        n = estimate(load_model_preset(name)).total_params
        print(f"{name:14s} {n:>16,d} params")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "info": cmd_info,
    "presets": cmd_presets,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=fn.__doc__.splitlines()[0])
        p.add_argument("--config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=llama3-8b")
        if name == "info":
            p.add_argument("--seq-len", type=int, default=None, help="context (default: max)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"moe-lab {args.command}: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
