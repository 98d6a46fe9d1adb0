"""Generation with an expert ensemble, re-routed at every token, each expert with its own KV cache.

An expert that routing brings in mid-sequence first catches up on the tokens it has not seen (its
prefill, counted in :attr:`ExpertEnsemble.tokens_run` like every token it processes); an expert
routing drops keeps its cache and catches up when it is chosen again. Generation thus costs each
active expert one token per step plus its catch-ups: linear in the length, where recomputing the
chosen experts over the whole sequence at every step (``use_cache=False``, the reference) is
quadratic.

When routing keeps the same k > 1 dense experts for a second step, they decode as one batch
(:class:`~moe_lab.ensembles.stacked.StackedExperts`): their caches move into one k-row cache (a copy
of what they hold) and their weights are stacked (a copy of the k experts' weights, kept while the
set lasts; on a GPU only while that copy takes under half the free memory). Each expert still
processes the same tokens, so the counts do not change; only the wall-clock does
(``bench/ensemble.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from moe_lab.ensembles.ensemble import ExpertEnsemble
from moe_lab.ensembles.stacked import StackedExperts, stackable
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
    stack: bool = True,
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
    stack = stack and use_cache and stackable(experts)
    group: _Group | None = None
    no_room: set[tuple[int, ...]] = set()  # sets whose stacked copy would not fit
    ids, previous = list(prompt), None
    for _ in range(max_new_tokens):
        w = np.asarray(route(ids), dtype=np.float64)
        active = tuple(int(j) for j in np.flatnonzero(w > 0))
        logits: dict[int, torch.Tensor] = {}
        if stack and len(active) > 1 and active == previous and active not in no_room:
            if group is None or group.members != active:
                room = _room_to_stack([experts[j] for j in active])
                group = _Group(experts, active, caches, total) if room else None
            if group is None:
                no_room.add(active)
            else:
                logits = group.step(ids, caches, ensemble.tokens_run)
        for j in active:
            if j in logits:
                continue
            expert = experts[j]
            if use_cache:
                if caches[j] is None:
                    caches[j] = KVCache(expert.cfg, 1, total, param.device, param.dtype)
                new = ids[caches[j].length :]  # the prefill, a catch-up, or the last token
                out = expert(torch.tensor([new], device=param.device), cache=caches[j]).logits
            else:
                new = ids
                out = expert(torch.tensor([ids], device=param.device)).logits
            ensemble.tokens_run[j] += len(new)
            logits[j] = out[0, -1]
        previous = active
        mixed = None
        for j in active:
            if ensemble.mix == "logit":
                term = w[j] * logits[j].float()
                mixed = term if mixed is None else mixed + term
            else:
                term = logits[j].float().log_softmax(-1) + float(np.log(w[j]))
                mixed = term if mixed is None else torch.logaddexp(mixed, term)
        log_probs = mixed.log_softmax(-1) if ensemble.mix == "logit" else mixed
        token = int(sample_next(log_probs[None], temperature, top_p, generator)[0])
        ids.append(token)
        if token == eos_id or (stop is not None and stop(ids[len(prompt) :])):
            break
    return ids


def _room_to_stack(experts: list) -> bool:
    """Stacking copies the experts' weights: on a GPU, only while the copy takes under half the
    free memory (an optimisation must not be what runs out of memory); on CPU, always."""
    param = next(experts[0].parameters())
    if param.device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(param.device)
    need = sum(p.numel() * p.element_size() for e in experts for p in e.parameters())
    return need < free / 2


class _Group:
    """Experts ``members`` decoding as one batch: their weights stacked, their caches the rows of
    one k-row cache (each expert's own cache becomes a view of its row, so it stays the truth about
    what the expert has seen, and an expert that leaves the group takes its row along)."""

    def __init__(self, experts, members: tuple[int, ...], caches: list, total: int) -> None:
        self.members = members
        self.stacked = StackedExperts([experts[j] for j in members])
        self.cache = self.stacked.new_cache(total)
        for i, j in enumerate(members):  # every member ran at the previous step: it has a cache
            row = self.cache.row(i)
            row.length = caches[j].length
            for mine, theirs in zip(row.k + row.v, caches[j].k + caches[j].v, strict=True):
                mine[:, :, : row.length] = theirs[:, :, : row.length]
            caches[j] = row

    def step(self, ids: list[int], caches: list, tokens_run: list[int]) -> dict[int, torch.Tensor]:
        """Each member's logits after ``ids``: the group runs only when the same experts ran at
        the previous step, so every member has seen all but the last token."""
        self.cache.length = len(ids) - 1
        last = torch.full((len(self.members), 1), ids[-1], device=self.stacked.device)
        logits = self.stacked.last_logits(last, self.cache)
        for j in self.members:
            caches[j].length = len(ids)
            tokens_run[j] += 1
        return dict(zip(self.members, logits, strict=True))
