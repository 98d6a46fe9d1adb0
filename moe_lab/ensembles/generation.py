"""Generation with an expert ensemble, re-routed at every token, each expert with its own KV cache.

An expert that routing brings in mid-sequence first catches up on the tokens it has not seen (its
prefill, counted in :attr:`ExpertEnsemble.tokens_run` like every token it processes); an expert
routing drops keeps its cache and catches up when it is chosen again. Generation thus costs each
active expert one token per step plus its catch-ups: linear in the length, where recomputing the
chosen experts over the whole sequence at every step (``use_cache=False``, the reference) is
quadratic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from moe_lab.ensembles.ensemble import ExpertEnsemble
from moe_lab.eval.generation import sample_next
from moe_lab.nn.model import KVCache

__all__ = ["generate_ensemble"]


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
    use_cache: bool = True,
) -> list[int]:
    """Continue ``prompt`` (token ids, BOS first) with the ensemble, re-routing at every step.

    ``route(ids) -> [E]`` gives the weights for the next token after ``ids`` (e.g. the router's
    weights for the decoded text so far); only experts with a nonzero weight run. ``stop(new_ids)``,
    if given, ends generation when it returns True for the tokens generated so far.
    """
    experts = list(ensemble.experts)
    longest = min(e.cfg.max_seq_len for e in experts)
    if len(prompt) + max_new_tokens > longest:
        raise ValueError(
            f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the experts' "
            f"model.max_seq_len ({longest})"
        )
    ensemble.eval()
    param = next(ensemble.parameters())
    total = len(prompt) + max_new_tokens
    caches: list[KVCache | None] = [None] * len(experts)
    ids = list(prompt)
    for _ in range(max_new_tokens):
        w = np.asarray(route(ids), dtype=np.float64)
        mixed = None
        for j in np.flatnonzero(w > 0):
            expert = experts[j]
            if use_cache:
                if caches[j] is None:
                    caches[j] = KVCache(expert.cfg, 1, total, param.device, param.dtype)
                new = ids[caches[j].length :]  # the prefill, a catch-up, or the last token
                logits = expert(torch.tensor([new], device=param.device), cache=caches[j]).logits
            else:
                new = ids
                logits = expert(torch.tensor([ids], device=param.device)).logits
            ensemble.tokens_run[j] += len(new)
            logits = logits[0, -1].float()
            if ensemble.mix == "logit":
                term = w[j] * logits
                mixed = term if mixed is None else mixed + term
            else:
                term = logits.log_softmax(-1) + float(np.log(w[j]))
                mixed = term if mixed is None else torch.logaddexp(mixed, term)
        log_probs = mixed.log_softmax(-1) if ensemble.mix == "logit" else mixed
        token = int(sample_next(log_probs[None], temperature, top_p, generator)[0])
        ids.append(token)
        if token == eos_id or (stop is not None and stop(ids[len(prompt) :])):
            break
    return ids
