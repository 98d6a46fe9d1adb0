"""Evaluation throughput against the training forward pass (issue: evaluation at the speed of
training): a dense model's ``evaluate`` and a top-2 expert ensemble's ``ensemble_document_nll``
on the shipped corpus' validation documents, against ``model.loss`` on full training batches of
the same model, without gradients.

Targets: dense evaluation at least 0.8 of the forward pass's tokens/s; the top-2 ensemble at
least 0.8/2. Evaluation pays for what training does not: every document in its own attention
span (packing leaves padding), per-document bookkeeping, and for the ensemble one document per
row, so each expert runs on exactly the documents routed to it.

    python bench/evaluation.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from timing import write_json

from moe_lab import ModelConfig, build_model, load_config
from moe_lab.data.tokenizer import ByteTokenizer
from moe_lab.ensembles.ensemble import ExpertEnsemble, ensemble_document_nll
from moe_lab.eval.evaluate import evaluate, validation_store

CFG = ModelConfig(
    dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_hidden=688, vocab_size=259, max_seq_len=256
)


def _best(fn, rounds: int) -> float:
    """The fastest of ``rounds`` calls, in seconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default="bench/results/evaluation.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    B, T = args.batch, args.seq_len
    store = validation_store(load_config(), ByteTokenizer())
    experts = [build_model(CFG).eval() for _ in range(4)]
    model = experts[0]
    tokens = int(store.offsets[-1]) - store.n_docs  # every token after a BOS is predicted
    x = torch.randint(0, CFG.vocab_size, (B, T))
    steps = -(-tokens // (B * T))  # forward passes over as many tokens as evaluation predicts

    def forward():
        for _ in range(steps):
            model.loss(x, x)

    def dense():
        evaluate(model, store, T, B)

    def top2(d: int) -> np.ndarray:
        n = int(store.offsets[d + 1] - store.offsets[d] - 1)
        w = np.zeros((n, 4))
        w[:, [d % 4, (d + 1) % 4]] = 0.5
        return w

    def ensemble():
        ensemble_document_nll(ExpertEnsemble(experts), store, top2, T, B)

    with torch.no_grad():
        seconds = {
            "training forward": _best(forward, args.rounds) * tokens / (steps * B * T),
            "dense evaluation": _best(dense, args.rounds),
            "top-2 ensemble evaluation": _best(ensemble, args.rounds),
        }
    base = tokens / seconds["training forward"]
    targets = {"training forward": 1.0, "dense evaluation": 0.8, "top-2 ensemble evaluation": 0.4}
    print(f"{tokens:,d} validation tokens, {store.n_docs} documents, batch {B} x {T}")
    print(f"{'':28s} {'tok/s':>9s} {'x forward':>10s} {'target':>7s}")
    rows = {}
    for name, sec in seconds.items():
        rate = tokens / sec
        rows[name] = {"tokens_per_s": rate, "relative": rate / base, "target": targets[name]}
        print(f"{name:28s} {rate:9.0f} {rate / base:10.3f} {targets[name]:7.2f}")
    write_json(args.out, {"tokens": tokens, "batch": B, "seq_len": T, "rows": rows})


if __name__ == "__main__":
    main()
