"""Expert-LM ensembles (BTM, C-BTM, X-ELM): per-token weights over whole expert models.

Probability-space mixing (C-BTM): ``p(x_t | x_<t) = sum_j w_tj p_j(x_t | x_<t)``, computed as a
log-sum-exp of ``log w_tj + log p_j`` so small probabilities do not underflow. Logit-space mixing
(X-ELM's downstream form): ``log_softmax(sum_j w_tj logits_j)``. Only experts with a nonzero weight
somewhere in a sequence run on it, and each expert runs once per batch on the sequences that chose
it.

Shapes: B = sequences, T = positions, V = vocabulary, E = experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from moe_lab.accounting import estimate
from moe_lab.config import ConfigError
from moe_lab.data.packing import IGNORE, TokenStore, eval_rows
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.ensembles.clustering import Clusterer
from moe_lab.ensembles.directory import load_experts
from moe_lab.ensembles.merge import average
from moe_lab.ensembles.posterior import (
    cached_prior,
    expert_log_likelihoods,
    posterior_weights,
    top_k_weights,
)
from moe_lab.ensembles.routers import ClusterRouter
from moe_lab.eval.evaluate import evaluate, summarize, validation_store
from moe_lab.eval.routing import routing_report
from moe_lab.nn.model import Transformer

__all__ = [
    "ExpertEnsemble",
    "cluster_router",
    "ensemble_document_nll",
    "evaluate_experts",
    "measured_cost",
]


class ExpertEnsemble(nn.Module):
    """E expert language models of one vocabulary, mixed per token.

    Args:
        experts: the expert models (they may differ in shape, not in vocabulary).
        mix: ``"prob"`` (C-BTM, default) or ``"logit"`` (X-ELM downstream).
    """

    def __init__(self, experts: Sequence[Transformer], mix: str = "prob") -> None:
        super().__init__()
        if mix not in ("prob", "logit"):
            raise ValueError(f"mix must be 'prob' or 'logit', got {mix!r}")
        vocab = {e.cfg.vocab_size for e in experts}
        if len(vocab) != 1:
            raise ValueError(f"experts disagree on model.vocab_size: {sorted(vocab)}")
        self.experts, self.mix = nn.ModuleList(experts), mix
        self.vocab_size = vocab.pop()
        self.sequences_run = [0] * len(experts)  # how many sequences each expert has processed
        self.tokens_run = [0] * len(experts)  # how many tokens (padding excluded): its cost

    def log_probs(
        self,
        input_ids: Tensor,
        weights: Tensor,
        doc_ids: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> Tensor:
        """Mixture log-probabilities: of ``targets`` ``[B, T]`` if given, else ``[B, T, V]``.

        Args:
            input_ids: ``[B, T]``.
            weights: ``[B, T, E]``, each row summing to 1 (zeros for experts not chosen).
            doc_ids: optional ``[B, T]`` document masking, passed to every expert.
            targets: optional ``[B, T]``; -100 entries get log-probability 0.
        """
        B, T = input_ids.shape
        if weights.shape != (B, T, len(self.experts)):
            raise ValueError(f"weights shape {tuple(weights.shape)} != {(B, T, len(self.experts))}")
        gather = targets.clamp(min=0)[..., None] if targets is not None else None
        width = 1 if gather is not None else self.vocab_size
        acc = input_ids.new_full(
            (B, T, width if self.mix == "prob" else self.vocab_size),
            float("-inf") if self.mix == "prob" else 0.0,
            dtype=torch.float32,
        )
        for j, expert in enumerate(self.experts):
            rows = (weights[..., j] > 0).any(dim=1).nonzero().squeeze(1)
            if len(rows) == 0:
                continue  # never executed: no sequence gave this expert any weight
            self.sequences_run[j] += len(rows)
            sub_docs = doc_ids[rows] if doc_ids is not None else None
            real = int((sub_docs >= 0).sum()) if sub_docs is not None else len(rows) * T
            self.tokens_run[j] += real  # padding (doc id -1) is not counted
            logits = expert(input_ids[rows], doc_ids=sub_docs).logits.float()  # [b, T, V]
            w = weights[rows, :, j, None].float()
            if self.mix == "logit":
                acc[rows] += w * logits
                continue
            lp = logits.log_softmax(dim=-1)
            lp = lp.gather(-1, gather[rows]) if gather is not None else lp
            acc[rows] = torch.logaddexp(acc[rows], lp + w.log())  # log w = -inf drops the term
        if self.mix == "logit":
            acc = acc.log_softmax(dim=-1)
            acc = acc.gather(-1, gather) if gather is not None else acc
        if targets is None:
            return acc
        return acc.squeeze(-1).masked_fill(targets == IGNORE, 0.0)


@torch.no_grad()
def ensemble_document_nll(
    ensemble: ExpertEnsemble,
    store: TokenStore,
    doc_weights: Callable[[int], np.ndarray],
    seq_len: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    router_flops_per_token: float = 0.0,
) -> dict:
    """Per-group loss, perplexity and bits per byte of an ensemble (see moe_lab.eval.evaluate),
    under ``routing`` the share of the routing weight each expert got, overall and per group
    value (which expert served which group's documents), and under ``inference`` the FLOPs per
    predicted token that were spent (:func:`measured_cost`).

    Args:
        doc_weights: document index -> ``[n_inputs, E]`` weights, row p for the prediction made
            after the document's first p + 1 tokens (BOS included). Routing by the prefix
            (:meth:`~moe_lab.ensembles.routers.ClusterRouter.prefix_weights`), uniform, or by an
            oracle cluster label all fit this form.
    """
    ensemble.eval()
    before = list(ensemble.tokens_run)
    nll = np.zeros(store.n_docs, dtype=np.float64)
    count = np.zeros(store.n_docs, dtype=np.int64)
    cache: dict[int, np.ndarray] = {}  # weights of the documents in the current batch
    E = len(ensemble.experts)
    served = np.zeros((store.n_docs, 1, E))  # routing weight per document and expert
    # One document per row: an expert runs on the documents that chose it and on no other.
    for batch in eval_rows(store, seq_len, batch_size, pack=False):
        docs, pos = batch["doc_index"], batch["doc_pos"]
        # Padding gets zero weight for every expert (its targets are ignored), so it never makes
        # an expert run on a row that did not choose it.
        weights = np.zeros((*docs.shape, E))
        needed = [d for d in docs.unique().tolist() if d >= 0]
        cache = {d: cache[d] if d in cache else doc_weights(d) for d in needed}
        for d in needed:
            mask = (docs == d).numpy()
            weights[mask] = cache[d][pos.numpy()[mask]]
        lp = ensemble.log_probs(
            batch["input_ids"].to(device),
            torch.from_numpy(weights).to(device),
            batch["doc_ids"].to(device),
            batch["targets"].to(device),
        )
        scored = (batch["targets"] != IGNORE).numpy()
        np.add.at(nll, docs.numpy()[scored], -lp.cpu().double().numpy()[scored])
        np.add.at(count, docs.numpy()[scored], 1)
        np.add.at(served[:, 0], docs.numpy()[scored], weights[scored])
    report = summarize(nll, count, store)
    report["routing"] = routing_report(served, store)
    ran = [after - b for after, b in zip(ensemble.tokens_run, before, strict=True)]
    report["inference"] = measured_cost(
        ensemble, ran, int(count.sum()), seq_len, router_flops_per_token
    )
    return report


def measured_cost(
    ensemble: ExpertEnsemble,
    tokens_run: Sequence[int],
    predicted: int,
    seq_len: int,
    router_flops_per_token: float = 0.0,
) -> dict:
    """The inference FLOPs per predicted token an ensemble spent: every token each expert
    processed at its forward cost (:func:`moe_lab.accounting.estimate`), plus the router's, over
    the tokens predicted. An expert runs on a whole sequence once any position gives it weight, so
    prefix routing that shifts within a document costs more than k experts."""
    per_expert = [estimate(e.cfg, seq_len).inference_flops_per_token for e in ensemble.experts]
    spent = sum(n * f for n, f in zip(tokens_run, per_expert, strict=True))
    predicted = max(predicted, 1)
    return {
        "flops_per_token": spent / predicted + router_flops_per_token,
        "expert_passes_per_token": sum(tokens_run) / predicted,
        "router_flops_per_token": router_flops_per_token,
        "tokens_per_expert": list(tokens_run),
    }


def router_flops_per_token(routing: str, router: ClusterRouter | None) -> float:
    """Prefix routing adds each new word's projection and measures E distances at every token;
    the other modes route once per document (or not at all)."""
    if routing != "prefix" or router is None:
        return 0.0
    return 2.0 * router.clusterer.n_components * (router.n_experts + 1)


def cluster_router(ens, n_experts: int):
    """The :class:`~moe_lab.ensembles.routers.ClusterRouter` of ``ensemble.clusters_dir``, checked
    to have one cluster per expert."""
    if ens.clusters_dir is None:
        raise ConfigError(f"ensemble.routing={ens.routing} needs ensemble.clusters_dir")
    clusterer = Clusterer.load(Path(ens.clusters_dir) / "clusterer")
    router = ClusterRouter(clusterer, ens.temperature, ens.top_k, ens.distance)
    if router.n_experts != n_experts:
        raise ConfigError(f"the clusterer has {router.n_experts} clusters for {n_experts} experts")
    return router


def evaluate_experts(experts_dir, cfg, device="cpu") -> dict:
    """``moe-lab eval`` of a :func:`~moe_lab.train.branch.train_experts` directory, per
    ``cfg.ensemble``.

    ``prefix`` routes each prediction by the document so far; ``document`` routes a document once,
    by its first ``route_tokens`` tokens, so exactly ``top_k`` experts run on it (those first
    predictions are made by experts chosen with them in view); ``posterior`` routes by the
    experts' own likelihoods (:mod:`moe_lab.ensembles.posterior`); ``uniform`` weighs every
    expert alike; ``oracle`` routes a whole document by its own nearest cluster (it sees the
    future: an upper bound on routing); ``average`` evaluates one model with the experts'
    parameters averaged.
    """
    ens = cfg.ensemble
    names, experts = load_experts(experts_dir, device=device)
    first_run = Path(experts_dir) / "experts" / names[0] / "run"
    tokenizer = load_tokenizer(first_run / "tokenizer")
    store = validation_store(cfg, tokenizer)
    E, seq_len = len(experts), cfg.train.seq_len
    out = {"experts": names, "ensemble": asdict(ens)}
    if ens.routing == "average":
        return {**out, "valid": evaluate(average(experts), store, seq_len, cfg.train.eval_batch,
                                         device)}  # fmt: skip
    ensemble = ExpertEnsemble(experts, mix=ens.mix)
    if ens.routing == "posterior" and ens.prior == "updating":
        return {
            **out,
            "valid": _posterior_document_nll(ensemble, store, seq_len, ens.top_k, device),
        }
    router = cluster_router(ens, E) if ens.routing in ("prefix", "document", "oracle") else None
    fixed = None
    if ens.routing == "posterior":  # a cached prior: the same experts for every document
        docs = [doc_tokens(store, d) for d in range(min(ens.prior_docs, store.n_docs))]
        prior = cached_prior(
            [expert_log_likelihoods(experts, doc, seq_len, device) for doc in docs]
        )
        fixed = top_k_weights(prior[None], ens.top_k)[0]
        out["prior"] = prior.tolist()
    doc_weights = routing_weights(ens, E, store, tokenizer, router, fixed)
    report = ensemble_document_nll(
        ensemble,
        store,
        doc_weights,
        seq_len,
        cfg.train.eval_batch,
        device,
        router_flops_per_token(ens.routing, router),
    )
    return {
        **out,
        "valid": report,
        "sequences_run_per_expert": dict(zip(names, ensemble.sequences_run, strict=True)),
    }


def doc_tokens(store: TokenStore, d: int) -> list[int]:
    """Document ``d`` of ``store``, ``[BOS, x_1, ..., EOS]``."""
    return store.tokens[store.offsets[d] : store.offsets[d + 1]].tolist()


def routing_weights(
    ens, E: int, store: TokenStore, tokenizer, router: ClusterRouter | None, fixed=None
) -> Callable[[int], np.ndarray]:
    """Document index -> ``[n_inputs, E]`` weights under ``ens.routing`` (any but ``average``
    and the updating posterior, which need the experts' scores); ``fixed``: the ``[E]``
    weights of a cached posterior (uniform's are built here)."""
    if ens.routing == "uniform":
        fixed = np.full(E, 1.0 / E)

    def doc_weights(d: int) -> np.ndarray:
        doc = doc_tokens(store, d)
        n_inputs = len(doc) - 1
        if fixed is not None:
            return np.tile(fixed, (n_inputs, 1))
        if ens.routing == "oracle":
            label = router.clusterer.predict([tokenizer.decode(doc[1:-1])])[0]
            return np.eye(E)[np.full(n_inputs, label)]
        if ens.routing == "document":
            w = router.weights([tokenizer.decode(doc[1 : 1 + ens.route_tokens])])[0]
            return np.tile(w, (n_inputs, 1))
        return router.document_weights(doc, tokenizer)

    return doc_weights


def _posterior_document_nll(
    ensemble: ExpertEnsemble, store: TokenStore, seq_len: int, top_k: int | None, device
) -> dict:
    """Evaluation with BTM's updating posterior: every expert scores each document (the
    likelihoods the posterior needs), and the mixture is formed from those same scores."""
    logliks = [
        expert_log_likelihoods(ensemble.experts, doc_tokens(store, d), seq_len, device)
        for d in range(store.n_docs)
    ]
    weights = [posterior_weights(loglik, None, top_k) for loglik in logliks]
    return mixed_report(ensemble, logliks, weights, store, seq_len, every_expert_runs=True)


def mixed_report(
    ensemble: ExpertEnsemble,
    logliks: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    store: TokenStore,
    seq_len: int,
    every_expert_runs: bool = False,
    router_flops: float = 0.0,
) -> dict:
    """The report of a probability mixture formed from the experts' own scores: per document
    ``[E, N]`` log-probs and ``[N, E]`` weights. The cost is counted as evaluation spends it: an
    expert runs on a span of ``seq_len`` inputs once any position there gives it weight (every
    span, where ``every_expert_runs``: the updating posterior needs all the scores)."""
    E = len(ensemble.experts)
    nll, count = np.zeros(store.n_docs), np.zeros(store.n_docs, dtype=np.int64)
    served, ran = np.zeros((store.n_docs, 1, E)), np.zeros(E, dtype=np.int64)
    for d, (loglik_EN, w_NE) in enumerate(zip(logliks, weights, strict=True)):
        with np.errstate(divide="ignore"):  # log 0 = -inf drops an expert outside the top k
            mixed = np.logaddexp.reduce(np.log(w_NE.T) + loglik_EN, axis=0)
        nll[d], count[d], served[d, 0] = -mixed.sum(), len(mixed), w_NE.sum(axis=0)
        for start in range(0, len(mixed), seq_len):  # evaluation's spans of seq_len inputs
            span = w_NE[start : start + seq_len]
            ran += (np.ones(E, dtype=bool) if every_expert_runs else span.max(0) > 0) * len(span)
    report = summarize(nll, count, store)
    report["routing"] = routing_report(served, store)
    report["inference"] = measured_cost(
        ensemble, ran.tolist(), int(count.sum()), seq_len, router_flops
    )
    return report
