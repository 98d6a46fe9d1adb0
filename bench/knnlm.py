"""kNN-LM on the shipped corpus: datastore build time, search throughput, perplexity gain, flat vs
IVF-PQ.

Trains a small model on the shipped corpus (or takes a run), keys a share of its training
documents, then for each index tunes λ, τ and k on half of a set of validation documents and
reports the other half, next to the plain model on the same documents.

    python bench/knnlm.py                                  # cpu-tiny, 300 steps first
    python bench/knnlm.py --run-dir runs/mine --train-docs 0 --eval-docs 0   # everything
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from timing import write_json

from moe_lab.config import load_config
from moe_lab.data.documents import load_splits
from moe_lab.data.packing import IGNORE, build_store, cache_root, eval_rows
from moe_lab.eval.evaluate import summarize
from moe_lab.eval.knnlm import (
    IndexSpec,
    build_datastore,
    knn_document_nll,
    model_keys,
    score_tokens,
    split_documents,
    tune_knn,
)
from moe_lab.store.checkpoint import load_run
from moe_lab.train.loop import train


def _queries(model, ds, store, docs, seq_len):
    """Keys of every scored position of ``docs``, for timing the search alone."""
    out = []
    with torch.no_grad():
        for b in eval_rows(store, seq_len, 8, docs):
            keys, _ = model_keys(model, b["input_ids"], b["doc_ids"], ds.key_type)
            out.append(keys.flatten(0, 1)[(b["targets"] != IGNORE).flatten()].numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="an existing run (default: train cpu-tiny first)")
    parser.add_argument("--steps", type=int, default=300, help="training steps when training")
    parser.add_argument("--train-docs", type=int, default=300, help="datastore documents; 0: all")
    parser.add_argument("--eval-docs", type=int, default=20, help="validation documents; 0: all")
    parser.add_argument("--key-type", default="ffn_input", choices=["ffn_input", "final"])
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    parser.add_argument("--out", default="bench/results/knnlm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="knnlm-bench-"))
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = tmp / "run"
        overrides = [f"run.dir={run_dir}", f"train.max_steps={args.steps}", "train.progress=false"]
        train(load_config(None, overrides))
    cfg, model, tokenizer = load_run(run_dir)
    seq_len = cfg.train.seq_len
    train_docs, valid_docs, groups = load_splits(cfg)
    if args.train_docs:  # a seeded share of every domain, not the first documents of one
        pick = np.random.default_rng(0).permutation(len(train_docs))[: args.train_docs]
        train_docs = train_docs.select(np.sort(pick))
    cache = cache_root(cfg.data.cache_dir)
    store = build_store(train_docs, tokenizer, cfg.data.text_field, groups, cache)
    valid = build_store(valid_docs, tokenizer, cfg.data.text_field, groups, cache)

    start = time.perf_counter()
    ds = build_datastore(
        model, store, tmp / "knn", seq_len=seq_len, key_type=args.key_type, tokenizer=tokenizer
    )
    key_s = time.perf_counter() - start
    eval_docs = np.random.default_rng(0).permutation(valid.n_docs)
    eval_docs = eval_docs[: args.eval_docs] if args.eval_docs else eval_docs
    tune_idx, report_idx = split_documents(len(eval_docs))
    tune_docs, report_docs = np.sort(eval_docs[tune_idx]), np.sort(eval_docs[report_idx])
    queries = _queries(model, ds, valid, report_docs, seq_len)
    print(
        f"datastore: {ds.n_entries:,d} entries from {store.n_docs} documents, keys in "
        f"{key_s:.1f} s ({ds.n_entries / key_s:,.0f} tok/s); {len(tune_docs)} tuning and "
        f"{len(report_docs)} reported validation documents ({len(queries):,d} tokens); "
        f"{args.threads} thread(s); {args.key_type} keys"
    )
    header = (
        f"{'index':6s} {'build s':>8s} {'search q/s':>11s} {'lambda':>6s} {'tau':>6s} {'k':>4s} "
        f"{'lm ppl':>8s} {'knn ppl':>8s} {'lm bpb':>7s} {'knn bpb':>7s}"
    )
    print(header)
    rows = {}
    for kind in ("flat", "ivfpq"):
        start = time.perf_counter()
        ds.add_index(IndexSpec(kind))
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        ds.search(queries, 128, kind)
        qps = len(queries) / (time.perf_counter() - start)
        common = dict(seq_len=seq_len, index=kind)
        tuned = tune_knn(score_tokens(model, ds, valid, k=128, docs=tune_docs, **common))
        lam, tau, k = tuned["lambda"], tuned["temperature"], tuned["k"]
        scores = score_tokens(model, ds, valid, k=128, docs=report_docs, **common)
        lm = summarize(*knn_document_nll(scores, 0.0, 1.0, k), valid)["overall"]
        knn = summarize(*knn_document_nll(scores, lam, tau, k), valid)["overall"]
        rows[kind] = {
            "index_build_s": build_s,
            "search_queries_per_s_k128": qps,
            "lambda": lam,
            "temperature": tau,
            "k": k,
            "lm": lm,
            "knn": knn,
        }
        print(
            f"{kind:6s} {build_s:8.2f} {qps:11,.0f} {lam:6.2f} {tau:6.3g} {k:4d} "
            f"{lm['perplexity']:8.3f} {knn['perplexity']:8.3f} {lm['bits_per_byte']:7.4f} "
            f"{knn['bits_per_byte']:7.4f}"
        )
    write_json(
        args.out,
        {
            "run_dir": str(run_dir),
            "entries": ds.n_entries,
            "key_type": args.key_type,
            "train_docs": store.n_docs,
            "key_build_s": key_s,
            "tune_docs": tune_docs.tolist(),
            "report_docs": report_docs.tolist(),
            "report_tokens": len(queries),
            "threads": args.threads,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
