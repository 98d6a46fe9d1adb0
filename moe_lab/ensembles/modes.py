"""Several routing modes of one expert ensemble from one scoring pass.

Every expert scores every validation document once (its log-probability of each next token,
:func:`~moe_lab.ensembles.posterior.expert_log_likelihoods`), and each mode mixes those same
numbers with its own weights: ``log p = logsumexp_j(log w_tj + log p_j)``. That costs E expert
passes over the documents in all, where evaluating the modes one by one costs the sum of theirs
(uniform and the updating posterior alone cost E each, prefix and document routing k or more).

Each mode's report is what :func:`~moe_lab.ensembles.ensemble.evaluate_experts` gives for it
alone: the same losses (to float rounding), routing shares and inference cost, counted as if the
mode had run on its own (an expert runs on a span of ``seq_len`` inputs once any position of it
gives the expert weight; the updating posterior runs every expert everywhere). Probability mixing
only: logit mixing needs every expert's whole distribution, not the log-prob of the target.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from moe_lab.config import Config, ConfigError
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.ensembles.directory import load_experts
from moe_lab.ensembles.ensemble import (
    ExpertEnsemble,
    cluster_router,
    doc_tokens,
    mixed_report,
    router_flops_per_token,
    routing_weights,
)
from moe_lab.ensembles.posterior import (
    cached_prior,
    expert_log_likelihoods,
    posterior_weights,
    top_k_weights,
)
from moe_lab.eval.evaluate import validation_store

__all__ = ["MODES", "evaluate_routing_modes"]

# ensemble.routing values with per-token expert weights ("posterior" is ensemble.prior's, and
# "posterior-updating" names the updating prior here); "average" is one merged model.
MODES = ("prefix", "document", "uniform", "oracle", "posterior", "posterior-updating")


def evaluate_routing_modes(
    experts_dir: str | Path, cfg: Config, modes: list[str], device="cpu"
) -> dict[str, dict]:
    """Mode -> its ``evaluate_experts``-style report (``valid``), for the experts of a
    :func:`~moe_lab.train.branch.train_experts` directory, each expert scoring once."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ConfigError(f"routing modes {unknown} unknown: choose from {', '.join(MODES)}")
    if cfg.ensemble.mix != "prob":
        raise ConfigError("several routing modes from one pass need ensemble.mix=prob")
    names, experts = load_experts(experts_dir, device=device)
    tokenizer = load_tokenizer(Path(experts_dir) / "experts" / names[0] / "run" / "tokenizer")
    store = validation_store(cfg, tokenizer)
    E, seq_len = len(experts), cfg.train.seq_len
    docs = tqdm(range(store.n_docs), desc="scoring", unit="doc", disable=None, leave=False)
    logliks = [expert_log_likelihoods(experts, doc_tokens(store, d), seq_len, device) for d in docs]
    needs_router = {"prefix", "document", "oracle"} & set(modes)
    router = cluster_router(cfg.ensemble, E) if needs_router else None
    ensemble = ExpertEnsemble(experts)  # for its members' costs only: nothing runs here
    reports = {}
    for mode in modes:
        ens = replace(cfg.ensemble, routing=mode.split("-")[0])
        if mode == "posterior-updating":
            weights = [posterior_weights(loglik, None, ens.top_k) for loglik in logliks]
        else:
            fixed = None
            if mode == "posterior":  # BTM's cached prior, from the first prior_docs documents
                prior = cached_prior(logliks[: ens.prior_docs])
                fixed = top_k_weights(prior[None], ens.top_k)[0]
            weigh = routing_weights(ens, E, store, tokenizer, router, fixed)
            weights = [weigh(d) for d in range(store.n_docs)]
        every = mode == "posterior-updating"
        flops = router_flops_per_token(mode, router)
        reports[mode] = mixed_report(ensemble, logliks, weights, store, seq_len, every, flops)
    return reports
