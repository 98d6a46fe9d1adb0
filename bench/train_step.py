"""One dense training step: moe_lab vs transformers' LlamaForCausalLM, same config and weights.

Each step is forward + loss + backward + clip + AdamW, at fp32 (bf16 is 10-70x slower on CPU).
Variants are timed in interleaved rounds in one process and compared by median, so clock drift
hits all of them alike. MFU = model FLOPs (moe_lab.accounting) / time / the measured fp32
``torch.mm`` peak of this machine.

    python bench/train_step.py                      # both shapes, prints a table, writes JSON
    python bench/train_step.py --shapes small --rounds 10 --no-compile
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from timing import interleaved, write_json

from moe_lab import ModelConfig, build_model
from moe_lab.accounting import estimate
from moe_lab.interop.hf import to_hf

SHAPES = {
    "small": ModelConfig(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=2,
        ffn_hidden=688,
        vocab_size=8192,
        max_seq_len=256,
    ),
    "base": ModelConfig(
        dim=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        ffn_hidden=1376,
        vocab_size=8192,
        max_seq_len=256,
    ),
}


def variants(cfg: ModelConfig, batch: int, seq: int, compile_: bool):
    """name -> a zero-argument callable doing one full training step."""
    ours = build_model(cfg)
    hf = to_hf(ours).train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    targets = torch.cat([x[:, 1:], torch.full((batch, 1), -100)], dim=1)  # as HF shifts labels

    def step(model, optimizer, loss_fn):
        def run():
            loss = loss_fn(model)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    def adamw(model, fused):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    ours_fused_ce = lambda m: m.loss(x, targets)[0]  # noqa: E731
    ours_logits = lambda m: F.cross_entropy(  # noqa: E731
        m(x).logits.flatten(0, 1), targets.flatten(), ignore_index=-100
    )
    theirs = lambda m: m(input_ids=x, labels=x).loss  # noqa: E731
    ours_copy = build_model(cfg)
    ours_copy.load_state_dict(ours.state_dict())
    steps = {
        "moe_lab": step(ours, adamw(ours, True), ours_fused_ce),
        "moe_lab, logits + CE": step(ours_copy, adamw(ours_copy, True), ours_logits),
        "transformers, AdamW default": step(hf, adamw(hf, False), theirs),
        "transformers, AdamW fused": step(hf, adamw(hf, True), theirs),
    }
    if compile_:  # train.compile=true; compiled once here, outside the timed rounds
        compiled = build_model(cfg)
        compiled.load_state_dict(ours.state_dict())
        loss = torch.compile(compiled.loss)
        with torch.no_grad():
            torch.testing.assert_close(loss(x, targets)[0], ours.loss(x, targets)[0])
        steps["moe_lab, torch.compile"] = step(
            compiled, adamw(compiled, True), lambda m: loss(x, targets)[0]
        )
    return steps


def run_shape(name: str, batch: int, seq: int, rounds: int, warmup: int, compile_: bool) -> dict:
    cfg = SHAPES[name]
    medians, peak = interleaved(variants(cfg, batch, seq, compile_), rounds, warmup)
    flops = estimate(cfg, seq).train_flops_per_token * batch * seq
    base = medians["transformers, AdamW default"]
    best_hf = min(v for k, v in medians.items() if k.startswith("transformers"))
    rows = {}
    for key, med in medians.items():
        rows[key] = {
            "ms_per_step": med * 1e3,
            "tokens_per_s": batch * seq / med,
            "mfu": flops / med / peak,
            "speedup_vs_transformers_default": base / med,
            "speedup_vs_transformers_best": best_hf / med,
        }
    return {
        "shape": name,
        "config": cfg.__dict__ | {"rope_scaling": None},
        "batch": batch,
        "seq_len": seq,
        "flops_per_step": flops,
        "mm_peak_gflops": peak / 1e9,
        "rounds": rounds,
        "variants": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "shapes": [],
    }
    for name in args.shapes:
        res = run_shape(name, args.batch, args.seq, args.rounds, args.warmup, not args.no_compile)
        results["shapes"].append(res)
        print(
            f"\n{name}: batch {args.batch} x seq {args.seq}, "
            f"{res['flops_per_step'] / 1e9:.1f} GFLOP/step, median of {args.rounds} rounds, "
            f"fp32 torch.mm peak {res['mm_peak_gflops']:.0f} GFLOP/s "
            f"({torch.get_num_threads()} threads)"
        )
        print(
            f"{'variant':30s} {'ms/step':>9s} {'tok/s':>8s} {'MFU':>6s} "
            f"{'vs HF default':>14s} {'vs HF best':>11s}"
        )
        for key, row in res["variants"].items():
            print(
                f"{key:30s} {row['ms_per_step']:9.1f} {row['tokens_per_s']:8.0f} "
                f"{row['mfu']:6.1%} {row['speedup_vs_transformers_default']:13.2f}x "
                f"{row['speedup_vs_transformers_best']:10.2f}x"
            )
    write_json(args.out, results)


if __name__ == "__main__":
    main()
