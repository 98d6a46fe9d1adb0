"""kNN-LM for a run directory: the datastore lives in ``RUN_DIR/knn/``.

``moe-lab knn build RUN_DIR`` keys the run's training documents (in the order ``load_splits`` gives
them, so ``--doc N`` is the N-th training record), ``moe-lab knn optout RUN_DIR --doc N`` or
``--where domain=legal`` removes documents, and ``moe-lab eval RUN_DIR --knn`` tunes λ, τ and k on
one half of the validation documents and reports the other half, next to the plain model on the
same half.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from moe_lab.data.documents import load_splits
from moe_lab.data.packing import TokenStore, build_store, cache_root
from moe_lab.data.tokenizer import Tokenizer
from moe_lab.eval.evaluate import summarize
from moe_lab.eval.knnlm.datastore import Datastore, build_datastore
from moe_lab.eval.knnlm.index import IndexSpec
from moe_lab.eval.knnlm.lm import (
    DEFAULT_GRID,
    knn_document_nll,
    score_tokens,
    split_documents,
    tune_knn,
)
from moe_lab.eval.knnlm.optout import opt_out
from moe_lab.nn.model import Transformer
from moe_lab.store.checkpoint import load_run

__all__ = [
    "build_run_datastore",
    "datastore_dir",
    "evaluate_run_knn",
    "format_knn_report",
    "opt_out_run",
]

log = logging.getLogger(__name__)


def datastore_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "knn"


def build_run_datastore(
    run_dir: str | Path,
    index: str = "flat",
    key_type: str = "ffn_input",
    dtype: str = "float32",
    overrides: list[str] | tuple[str, ...] = (),
    device: torch.device | str = "cpu",
) -> Datastore:
    """Build ``RUN_DIR/knn`` from the run's latest checkpoint and training documents."""
    cfg, model, tokenizer = load_run(run_dir, overrides, device=device)
    train, _, groups = load_splits(cfg)
    store = build_store(
        train, tokenizer, cfg.data.text_field, groups, cache_root(cfg.data.cache_dir)
    )
    ds = build_datastore(
        model,
        store,
        datastore_dir(run_dir),
        seq_len=cfg.train.seq_len,
        batch_size=cfg.train.eval_batch,
        key_type=key_type,
        dtype=dtype,
        tokenizer=tokenizer,
        device=device,
        overwrite=True,
    )
    ds.add_index(IndexSpec(kind=index), progress=True)
    return ds


def opt_out_run(
    run_dir: str | Path,
    docs: Iterable[int] | None = None,
    where: dict[str, list[str]] | None = None,
) -> tuple[Datastore, int]:
    """Remove documents from ``RUN_DIR/knn``; returns ``(datastore, entries removed)``."""
    return opt_out(datastore_dir(run_dir), docs, where, progress=True)


def evaluate_run_knn(
    run_dir: str | Path,
    model: Transformer,
    tokenizer: Tokenizer,
    valid: TokenStore,
    seq_len: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    tune_fraction: float = 0.5,
) -> dict:
    """Tune on part of ``valid``, report the rest: the ``knn`` section of eval.json.

    Returns:
        ``{"index", "key_type", "entries", "tuned": {lambda, temperature, k, loss, grid},
        "tune_docs", "report_docs", "lm": summary, "knn": summary}``; ``lm`` is the plain model
        on the reported documents, ``knn`` the kNN-LM on the same documents.
    """
    ds = Datastore(datastore_dir(run_dir))
    ds.check(model, tokenizer)
    index = "ivfpq" if "ivfpq" in ds.manifest["indexes"] else "flat"
    tune_docs, report_docs = split_documents(valid.n_docs, tune_fraction)
    k_max = min(max(DEFAULT_GRID["ks"]), ds.n_entries)
    ks = sorted({min(k, ds.n_entries) for k in DEFAULT_GRID["ks"]})
    common = dict(seq_len=seq_len, batch_size=batch_size, index=index, device=device, progress=True)
    tuning = score_tokens(model, ds, valid, k=k_max, docs=tune_docs, **common)
    tuned = tune_knn(tuning, ks=ks)
    chosen = {name: tuned[name] for name in ("lambda", "temperature", "k", "loss")}
    log.info("kNN-LM tuned on %d documents: %s", len(tune_docs), chosen)
    # k_max neighbours as in tuning: the chosen k are the nearest of them after re-ranking
    scores = score_tokens(model, ds, valid, k=k_max, docs=report_docs, **common)
    return {
        "index": index,
        "key_type": ds.key_type,
        "entries": ds.n_entries,
        "tuned": tuned,
        "tune_docs": tune_docs.tolist(),
        "report_docs": report_docs.tolist(),
        "lm": summarize(*knn_document_nll(scores, 0.0, 1.0, tuned["k"]), valid),
        "knn": summarize(
            *knn_document_nll(scores, tuned["lambda"], tuned["temperature"], tuned["k"]), valid
        ),
    }


def format_knn_report(knn: dict) -> str:
    """The ``knn`` section of eval.json as a table: plain model vs kNN-LM on the same documents."""
    t = knn["tuned"]
    lines = [
        f"kNN-LM ({knn['index']}, {knn['entries']:,d} entries): lambda={t['lambda']} "
        f"temperature={t['temperature']} k={t['k']}, tuned on {len(knn['tune_docs'])} "
        f"documents; on the other {len(knn['report_docs'])}:",
        f"{'group':24s} {'lm ppl':>9s} {'knn ppl':>9s} {'lm bpb':>7s} {'knn bpb':>7s}",
    ]
    lm, nn = knn["lm"], knn["knn"]
    rows = [("overall", lm["overall"], nn["overall"])] + [
        (f"{field}={value}", m, nn["groups"][field][value])
        for field, values in lm["groups"].items()
        for value, m in values.items()
    ]
    for name, a, b in rows:
        lines.append(
            f"{name:24s} {a['perplexity']:9.2f} {b['perplexity']:9.2f} "
            f"{a['bits_per_byte']:7.4f} {b['bits_per_byte']:7.4f}"
        )
    return "\n".join(lines) + "\n"
