"""Dense Llama vs a compute-matched MoE, trained to the same FLOP budget on the shipped corpus.

    python examples/dense_vs_moe.py                    # ~1 minute on 2 CPU cores
    python examples/dense_vs_moe.py --flops 1e12 --out runs/dense_vs_moe

The MoE has 8 experts, top-2, each half as wide as the dense FFN, so both spend the same active
FLOPs per token (plus the router); both get ``train.max_flops`` and the accountant turns it into
steps. Prints validation loss overall and per domain.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from moe_lab import load_config
from moe_lab.accounting import estimate, matched_moe
from moe_lab.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", type=float, default=4e11, help="training FLOPs per variant")
    parser.add_argument("--out", default="runs/dense_vs_moe")
    args = parser.parse_args()
    base = load_config(
        overrides=[
            "model=cpu-tiny",
            "train.seq_len=128",
            "train.progress=false",
            "train.max_steps=null",
            f"train.max_flops={args.flops}",
            "run.resume=true",  # a rerun continues (or, finished, re-evaluates) each run
        ]
    )
    variants = {"dense": base.model, "moe-8x-top2": matched_moe(base.model, 8, 2)}
    results = {}
    for name, model in variants.items():
        cfg = replace(base, model=model, run=replace(base.run, dir=str(Path(args.out) / name)))
        est = estimate(model, cfg.train.seq_len)
        print(f"{name}: {est.total_params:,d} params, {est.active_params:,d} active")
        result = train(cfg)
        results[name] = (result, (result.run_dir / "eval.json").read_text())

    print(f"\n{'variant':14s} {'FLOPs':>9s} {'steps':>6s} {'valid':>7s}  per domain")
    for name, (result, report) in results.items():
        domains = json.loads(report)["valid"]["groups"]["domain"]
        per = " ".join(f"{d}={m['loss']:.3f}" for d, m in domains.items())
        print(f"{name:14s} {result.flops:9.3g} {result.steps:6d} {result.valid_loss:7.4f}  {per}")


if __name__ == "__main__":
    main()
