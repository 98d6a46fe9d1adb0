"""The cost of information-flow control: an IFC MoE under each principal against the dense model
of equal active compute (the Tiwari et al. overhead figure: 1.9% latency).

The IFC model has one expert per security domain (public + 3 private) in every layer, top-2,
experts half as wide as the dense FFN, so a token that may use two experts costs the dense FLOPs
plus the router. Timed: a forward pass (inference, no grad) over a batch, and greedy generation
with the KV cache, for the principal with every grant (4 experts allowed), one grant (2), none (1:
a single expert, half the dense FFN), and the same MoE without any policy. FLOPs per token from
moe_lab.accounting.

    python bench/ifc.py            # prints a table, writes bench/results/ifc.json
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from timing import interleaved, write_json

from moe_lab import ModelConfig, build_model
from moe_lab.accounting import estimate
from moe_lab.config import MoEConfig
from moe_lab.eval.generation import generate
from moe_lab.families.ifc import restrict_experts
from moe_lab.nn.experts import MoE

SHAPES = {  # name: (dim, layers, heads, kv heads, dense FFN width)
    "ifc experiment (d=128)": (128, 4, 4, 2, 352),
    "cpu-small (d=256)": (256, 4, 8, 2, 688),
}
POLICIES = {"no policy": None, "all 4 allowed": [0, 1, 2, 3], "2 allowed": [0, 1], "1 allowed": [0]}


def models(dim, layers, heads, kv, ffn):
    base = ModelConfig(
        dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, vocab_size=512, ffn_hidden=ffn
    )
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=ffn // 2)
    dense = build_model(base).eval()
    ifc = build_model(replace(base, moe=moe)).eval()
    return base, dense, ifc


def call(fn, model, experts=None):
    """``fn(model)`` with the IFC model's routers restricted to ``experts`` first."""

    def run():
        if any(isinstance(m, MoE) for m in model.modules()):
            restrict_experts(model, experts)
        fn(model)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/results/ifc.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    print(
        f"{'shape':24s} {'model':16s} {'fwd ms':>8s} {'x dense':>8s} {'gen ms':>8s} "
        f"{'x dense':>8s} {'GFLOP/tok':>10s} {'x dense':>8s}"
    )
    for shape, dims in SHAPES.items():
        base, dense, ifc = models(*dims)
        x = torch.randint(0, 512, (args.batch, args.seq))
        prompt = x[:, :16]

        def forward(model, x=x):
            with torch.no_grad():
                model(x)

        def greedy(model, prompt=prompt):
            generate(model, prompt, args.new_tokens)

        variants = {"dense/fwd": call(forward, dense), "dense/gen": call(greedy, dense)}
        for name, experts in POLICIES.items():
            variants[f"{name}/fwd"] = call(forward, ifc, experts)
            variants[f"{name}/gen"] = call(greedy, ifc, experts)
        times, _ = interleaved(variants, args.rounds, warmup=2)
        dense_flops = estimate(base, args.seq).forward_flops_per_token
        for name in ["dense", *POLICIES]:
            cfg = base
            if name != "dense":  # a token runs min(k, allowed) experts
                k = min(2, len(POLICIES[name] or range(4)))
                cfg = replace(ifc.cfg, moe=replace(ifc.cfg.moe, top_k=k))
            flops = estimate(cfg, args.seq).forward_flops_per_token
            row = {
                "shape": shape,
                "model": name,
                "forward_s": times[f"{name}/fwd"],
                "generate_s": times[f"{name}/gen"],
                "forward_vs_dense": times[f"{name}/fwd"] / times["dense/fwd"],
                "generate_vs_dense": times[f"{name}/gen"] / times["dense/gen"],
                "forward_flops_per_token": flops,
                "flops_vs_dense": flops / dense_flops,
            }
            results.append(row)
            print(
                f"{shape:24s} {name:16s} {row['forward_s'] * 1e3:8.2f} "
                f"{row['forward_vs_dense']:8.3f} {row['generate_s'] * 1e3:8.1f} "
                f"{row['generate_vs_dense']:8.3f} {flops / 1e9:10.4f} {row['flops_vs_dense']:8.4f}"
            )
    write_json(args.out, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
