"""Scoring an :class:`~moe_lab.ensembles.ensemble.ExpertEnsemble`: a :class:`Routing` weighs the
experts at every position from the context so far (C-BTM prefix routing through the clusterer,
uniform, or one expert for an X-ELM language), and :class:`EnsembleScorer` mixes their predictions.

Shapes: B = sequences, T = positions, V = vocabulary, E = experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from moe_lab.data.tokenizer import Tokenizer
from moe_lab.ensembles.ensemble import ExpertEnsemble
from moe_lab.ensembles.generation import generate_ensemble
from moe_lab.ensembles.routers import ClusterRouter
from moe_lab.eval.scoring import Scorer

__all__ = ["EnsembleScorer", "FixedRouting", "PrefixRouting", "Routing"]


class Routing:
    """Expert weights for each prediction, from the context so far."""

    n_experts: int

    def weights(self, seq: Sequence[int]) -> np.ndarray:
        """``[len(seq), E]``: row t weighs the experts for the token after ``seq[: t + 1]``."""
        raise NotImplementedError

    def last(self, seq: Sequence[int]) -> np.ndarray:
        """``[E]``: the weights for the token after the whole of ``seq`` (generation)."""
        return self.weights(seq)[-1]


class FixedRouting(Routing):
    """The same weights at every position: uniform, or one expert (an X-ELM language)."""

    def __init__(self, weights: np.ndarray) -> None:
        self.w = np.asarray(weights, dtype=np.float64)
        self.n_experts = len(self.w)

    @classmethod
    def uniform(cls, n_experts: int) -> FixedRouting:
        return cls(np.full(n_experts, 1.0 / n_experts))

    def weights(self, seq: Sequence[int]) -> np.ndarray:
        return np.broadcast_to(self.w, (len(seq), self.n_experts))

    def last(self, seq: Sequence[int]) -> np.ndarray:
        return self.w


class PrefixRouting(Routing):
    """C-BTM: the clusterer's weights for the decoded text so far (BOS excluded), up to its last
    complete word (:meth:`~moe_lab.ensembles.routers.ClusterRouter.prefix_weights`)."""

    def __init__(self, router: ClusterRouter, tokenizer: Tokenizer) -> None:
        self.router, self.tokenizer = router, tokenizer
        self.n_experts = router.n_experts

    def weights(self, seq: Sequence[int]) -> np.ndarray:
        seq, rows = list(seq), []
        if seq and seq[0] == self.tokenizer.bos_id:  # BOS is no text; it routes the first token
            seq, rows = seq[1:], [self.router.weights([""])]
        if seq:
            rows.append(self.router.prefix_weights(seq, self.tokenizer))
        return np.concatenate(rows)

    def last(self, seq: Sequence[int]) -> np.ndarray:
        seq = list(seq)[1:] if len(seq) and seq[0] == self.tokenizer.bos_id else list(seq)
        text = self.router.routing_text(self.tokenizer.decode(seq))
        return self.router.weights([text])[0]


class EnsembleScorer(Scorer):
    """An :class:`~moe_lab.ensembles.ensemble.ExpertEnsemble` mixed per position by ``routing``;
    only experts with weight somewhere in a sequence run on it."""

    def __init__(
        self,
        ensemble: ExpertEnsemble,
        routing: Routing,
        tokenizer: Tokenizer,
        batch_size: int = 8,
    ) -> None:
        if routing.n_experts != len(ensemble.experts):
            raise ValueError(
                f"the routing weighs {routing.n_experts} experts, the ensemble has "
                f"{len(ensemble.experts)}"
            )
        self.ensemble, self.routing = ensemble.eval(), routing
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.max_len = min(e.cfg.max_seq_len for e in ensemble.experts)
        self.device = next(ensemble.parameters()).device

    def _log_probs(self, input_ids: Tensor, inputs: list[list[int]]) -> Tensor:
        B, T = input_ids.shape
        weights = np.zeros((B, T, len(self.ensemble.experts)))  # padding: no expert runs for it
        for r, seq in enumerate(inputs):
            weights[r, : len(seq)] = self.routing.weights(seq)
        w = torch.from_numpy(weights).float().to(self.device)
        return self.ensemble.log_probs(input_ids, w)

    def _greedy(
        self, prompt: list[int], max_new_tokens: int, stop: Callable[[list[int]], bool]
    ) -> list[int]:
        eos = self.tokenizer.eos_id
        ids = generate_ensemble(
            self.ensemble, prompt, max_new_tokens, self.routing.last, eos_id=eos, stop=stop
        )
        return ids[len(prompt) :]
