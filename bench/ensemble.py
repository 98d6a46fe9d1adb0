"""Top-k expert-ensemble throughput vs one expert (C-BTM inference cost): evaluation, and
generation with each expert's KV cache (the active experts stacked into one batch, and one at a
time).

E identical-shape experts; every sequence is routed to k of them (weights given, so only model
cost is measured). An ensemble with k active experts does k times one expert's work, so the ideal
throughput is 1/k of a single expert's; the target is at least 0.9/k. Generation is timed at 64,
256 and 1024 new tokens: cached, its cost per token stays nearly flat with the length (linear
cost); the uncached reference (every step recomputes the whole sequence) is timed alongside.

    python bench/ensemble.py                  # both parts, prints tables, writes JSON
    python bench/ensemble.py --skip-eval --lengths 64 256
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from timing import interleaved, write_json

from moe_lab import ModelConfig, build_model
from moe_lab.ensembles.ensemble import ExpertEnsemble
from moe_lab.ensembles.generation import generate_ensemble
from moe_lab.ensembles.stacked import StackedExperts
from moe_lab.eval.generation import generate

CFG = ModelConfig(
    dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_hidden=688, vocab_size=8192, max_seq_len=256
)
GEN_CFG = ModelConfig(
    dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_hidden=688, vocab_size=8192, max_seq_len=1040
)


def generation(E: int, lengths: list[int], rounds: int) -> dict:
    """Tokens/s of greedy generation: one expert (moe_lab.eval.generation.generate, cached)
    against top-k ensembles, cached with the active experts stacked (the default), cached one
    expert at a time, and (up to 256 tokens) uncached. "one expert, stacked" is one expert through
    the stacked path (k=1), the like-for-like base of the stacked ensembles' cost in k."""
    torch.manual_seed(0)
    experts = [build_model(GEN_CFG).eval() for _ in range(E)]
    prompt = [1, *torch.randint(3, 8192, (15,)).tolist()]

    def fixed(k):
        w = np.zeros(E)
        w[:k] = 1.0 / k
        return lambda ids: w

    def one_stacked(n):
        stacked = StackedExperts(experts[:1])
        cache, ids = stacked.new_cache(len(prompt) + n), torch.tensor([prompt])
        for _ in range(n):
            ids = stacked.last_logits(ids, cache).argmax(-1, keepdim=True)

    def ensemble(k, n, **options):
        ens = ExpertEnsemble(experts)
        return lambda: generate_ensemble(ens, prompt, n, fixed(k), **options)

    rows: dict[str, dict] = {}
    print(f"\ngeneration, {E} experts, prompt {len(prompt)} tokens, greedy")
    print(
        f"{'variant':28s} {'new tokens':>10s} {'tok/s':>8s} {'x one':>7s} {'target':>7s} "
        f"{'x one stacked':>13s}"
    )
    for n in lengths:
        variants = {
            "one expert": lambda n=n: generate(experts[0], torch.tensor([prompt]), n),
            "one expert, stacked": lambda n=n: one_stacked(n),
        }
        for k in (1, 2, 4):
            variants[f"ensemble top-{k}"] = ensemble(k, n)
        for k in (2, 4):
            variants[f"ensemble top-{k} unstacked"] = ensemble(k, n, stack=False)
        if n <= 256:
            variants["ensemble top-1 uncached"] = ensemble(1, n, use_cache=False)
        with torch.no_grad():
            medians, _ = interleaved(variants, rounds, 1)
        base, stacked = medians["one expert"], medians["one expert, stacked"]
        for key, sec in medians.items():
            k = int(key.split("-")[1].split()[0]) if "top-" in key else 1
            rel = base / sec
            row = {"new_tokens": n, "tokens_per_s": n / sec, "relative_to_one_expert": rel}
            row["relative_to_one_expert_stacked"] = stacked / sec  # the like-for-like base
            rows[f"{key}, {n} tokens"] = {**row, "target": 0.9 / k}
            line = f"{key:28s} {n:10d} {n / sec:8.0f} {rel:7.3f} {0.9 / k:7.3f}"
            print(f"{line} {stacked / sec:13.3f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="bench/results/ensemble.json")
    parser.add_argument("--skip-eval", action="store_true", help="generation only")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--gen-rounds", type=int, default=3)
    args = parser.parse_args()
    results = {"experts": args.experts}
    if not args.skip_eval:
        results["rows"] = evaluation(args)
    results["generation"] = generation(4, args.lengths, args.gen_rounds)
    write_json(args.out, results)


def evaluation(args) -> dict:
    """Tokens/s of top-k ensemble evaluation (log-probs of a batch) against one expert."""
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
    return rows


if __name__ == "__main__":
    main()
