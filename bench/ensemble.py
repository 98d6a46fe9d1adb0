"""Top-k expert-ensemble evaluation throughput vs one expert (C-BTM inference cost).

E identical-shape experts; every sequence is routed to k of them (weights given, so only model
cost is measured). An ensemble with k active experts does k times one expert's work, so the ideal
throughput is 1/k of a single expert's; the target is at least 0.9/k.

    python bench/ensemble.py
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved, write_json

from moe_lab import ModelConfig, build_model
from moe_lab.ensembles.ensemble import ExpertEnsemble

CFG = ModelConfig(
    dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_hidden=688, vocab_size=8192, max_seq_len=256
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="bench/results/ensemble.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    E, B, T = args.experts, 8, 256
    experts = [build_model(CFG).eval() for _ in range(E)]
    ensemble = ExpertEnsemble(experts)
    x, t = torch.randint(0, 8192, (B, T)), torch.randint(0, 8192, (B, T))

    def routed(k):
        w = torch.zeros(B, T, E)
        for b in range(B):  # k distinct experts per sequence, spread over all E
            w[b, :, [(b + i) % E for i in range(k)]] = 1.0 / k
        return lambda: ensemble.log_probs(x, w, targets=t)

    def single():
        experts[0](x).logits.log_softmax(-1).gather(-1, t[..., None])

    variants = {"one expert": single, **{f"ensemble top-{k}": routed(k) for k in (1, 2, 4)}}
    with torch.no_grad():
        medians, _ = interleaved(variants, args.rounds, args.warmup)
    base = medians["one expert"]
    print(
        f"{E} experts, batch {B} x {T} tokens\n{'variant':18s} {'tok/s':>9s} {'x one':>7s} "
        f"{'target':>7s}"
    )
    rows = {}
    for key, sec in medians.items():
        k = int(key.split("-")[1]) if "top-" in key else 1
        rel = base / sec
        rows[key] = {"tokens_per_s": B * T / sec, "relative_to_one_expert": rel, "target": 0.9 / k}
        print(f"{key:18s} {B * T / sec:9.0f} {rel:7.3f} {0.9 / k:7.3f}")
    write_json(args.out, {"experts": E, "rows": rows})


if __name__ == "__main__":
    main()
