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

from moe_lab.config import ConfigError
from moe_lab.data.packing import IGNORE, TokenStore, eval_rows
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.ensembles.clustering import Clusterer
from moe_lab.ensembles.directory import load_experts
from moe_lab.ensembles.merge import average
from moe_lab.ensembles.routers import ClusterRouter
from moe_lab.eval.evaluate import evaluate, summarize, validation_store
from moe_lab.eval.generation import sample_next
from moe_lab.eval.routing import routing_report
from moe_lab.nn.model import Transformer

__all__ = [
    "ExpertEnsemble",
    "cluster_router",
    "ensemble_document_nll",
    "evaluate_experts",
    "generate_ensemble",
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
) -> dict:
    """Per-group loss, perplexity and bits per byte of an ensemble (see moe_lab.eval.evaluate),
    and under ``routing`` the share of the routing weight each expert got, overall and per group
    value (which expert served which group's documents).

    Args:
        doc_weights: document index -> ``[n_inputs, E]`` weights, row p for the prediction made
            after the document's first p + 1 tokens (BOS included). Routing by the prefix
            (:meth:`~moe_lab.ensembles.routers.ClusterRouter.prefix_weights`), uniform, or by an
            oracle cluster label all fit this form.
    """
    ensemble.eval()
    nll = np.zeros(store.n_docs, dtype=np.float64)
    count = np.zeros(store.n_docs, dtype=np.int64)
    cache: dict[int, np.ndarray] = {}  # weights of the documents in the current batch
    E = len(ensemble.experts)
    served = np.zeros((store.n_docs, 1, E))  # routing weight per document and expert
    for batch in eval_rows(store, seq_len, batch_size):
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
    return report


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

    ``prefix`` routes each prediction by the document so far, ``uniform`` weighs every expert
    alike, ``oracle`` routes a whole document by its own nearest cluster (it sees the future: an
    upper bound on routing), ``average`` evaluates one model with the experts' parameters averaged.
    """
    ens = cfg.ensemble
    names, experts = load_experts(experts_dir, device=device)
    first_run = Path(experts_dir) / "experts" / names[0] / "run"
    tokenizer = load_tokenizer(first_run / "tokenizer")
    store = validation_store(cfg, tokenizer)
    E = len(experts)
    if ens.routing == "average":
        report = evaluate(average(experts), store, cfg.train.seq_len, cfg.train.eval_batch, device)
        return {"experts": names, "ensemble": asdict(ens), "valid": report}
    router = None if ens.routing == "uniform" else cluster_router(ens, E)

    def doc_weights(d: int) -> np.ndarray:
        doc = store.tokens[store.offsets[d] : store.offsets[d + 1]].tolist()
        n_inputs = len(doc) - 1
        if router is None:
            return np.full((n_inputs, E), 1.0 / E)
        if ens.routing == "oracle":
            label = router.clusterer.predict([tokenizer.decode(doc[1:-1])])[0]
            return np.eye(E)[np.full(n_inputs, label)]
        return router.document_weights(doc, tokenizer)

    ensemble = ExpertEnsemble(experts, mix=ens.mix)
    report = ensemble_document_nll(
        ensemble, store, doc_weights, cfg.train.seq_len, cfg.train.eval_batch, device
    )
    return {
        "experts": names,
        "ensemble": asdict(ens),
        "valid": report,
        "sequences_run_per_expert": dict(zip(names, ensemble.sequences_run, strict=True)),
    }


@torch.no_grad()
def generate_ensemble(
    ensemble: ExpertEnsemble,
    prompt: list[int],
    max_new_tokens: int,
    route: Callable[[list[int]], np.ndarray],
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Continue ``prompt`` (token ids, BOS first) with the ensemble, re-routing at every step.

    ``route(ids) -> [E]`` gives the weights for the next token after ``ids`` (e.g. the router's
    weights for the decoded text so far). ``stop(new_ids)``, if given, ends generation when it
    returns True for the tokens generated so far. Each step recomputes the chosen experts on the
    whole sequence (no KV cache): simple, and cheap at the lengths small experts are used for.
    """
    ids = list(prompt)
    device = next(ensemble.parameters()).device
    for _ in range(max_new_tokens):
        x = torch.tensor([ids], device=device)
        w = torch.as_tensor(route(ids), dtype=torch.float32, device=device)
        weights = w.expand(1, len(ids), -1)  # only the last position's mixture is used
        lp = ensemble.log_probs(x, weights)[:, -1]
        token = int(sample_next(lp, temperature, top_p, generator)[0])
        ids.append(token)
        if token == eos_id or (stop is not None and stop(ids[len(prompt) :])):
            break
    return ids
