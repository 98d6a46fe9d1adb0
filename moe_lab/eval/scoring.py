"""One scoring interface for every moe_lab model: token log-probabilities and greedy continuation.

A :class:`Scorer` turns token sequences into ``log p(x_t | x_<t)`` for ``t >= 1`` and continues a
prompt greedily. Few-shot scoring (:mod:`moe_lab.eval.fewshot`) and the lm-evaluation-harness
adapter (:mod:`moe_lab.interop.harness`) are written against it, so they work unchanged for

- a single :class:`~moe_lab.nn.model.Transformer`, dense or MoE (also an information-flow-control
  model in MoE form, whose routers only see the permitted experts): :class:`TransformerScorer`;
- a routed :class:`~moe_lab.ensembles.ensemble.ExpertEnsemble`: :class:`EnsembleScorer`, with a
  :class:`Routing` that weighs the experts at every position from the context so far (C-BTM prefix
  routing through the clusterer, uniform, or one expert for an X-ELM language).

:func:`moe_lab.families.loading.load_scorer` loads any directory ``moe-lab eval`` takes.

Shapes: B = sequences, T = positions, V = vocabulary, E = experts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from moe_lab.data.tokenizer import Tokenizer
from moe_lab.nn.model import KVCache, Transformer

__all__ = ["Scorer", "TokenScores", "TransformerScorer", "encode_pair", "rolling_windows"]

log = logging.getLogger(__name__)


@dataclass
class TokenScores:
    """Scores of the tokens ``x_1 .. x_n`` of one sequence ``x_0 .. x_n``."""

    logprobs: np.ndarray  # [n] fp32 log p(x_t | x_<t)
    greedy: np.ndarray  # [n] bool: x_t is the argmax of p(. | x_<t)


class Scorer:
    """Log-probabilities of token sequences and greedy continuation, for any moe_lab model.

    Subclasses implement :meth:`_log_probs` (and may override :meth:`_greedy`). Sequences are
    scored in batches of right-padded sequences of similar length: the models are causal, so
    padding after a sequence never changes its scores (an MoE with a capacity factor, where tokens
    compete for expert capacity, is scored one sequence at a time).
    """

    tokenizer: Tokenizer
    max_len: int  # input positions the model takes; a scored sequence may be one token longer
    batch_size: int
    device: torch.device

    def _log_probs(self, input_ids: Tensor, inputs: list[list[int]]) -> Tensor:
        """``[B, T, V]`` fp32 next-token log-probabilities of right-padded ``input_ids [B, T]``;
        ``inputs`` are the unpadded rows."""
        raise NotImplementedError

    def _greedy(
        self, prompt: list[int], max_new_tokens: int, stop: Callable[[list[int]], bool]
    ) -> list[int]:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, seqs: Sequence[Sequence[int]], progress: bool = False) -> list[TokenScores]:
        """Scores of ``seqs[i][1:]`` given their prefixes, for every sequence.

        Args:
            seqs: token sequences of 2 to ``max_len + 1`` tokens (the first one, usually BOS,
                is only context).
            progress: show a tqdm bar over batches (on a terminal only).

        Raises:
            ValueError: a sequence too short or longer than the model's context.
        """
        for i, s in enumerate(seqs):
            if not 2 <= len(s) <= self.max_len + 1:
                raise ValueError(
                    f"sequence {i} has {len(s)} tokens; a scored sequence needs 2 to "
                    f"max_len + 1 = {self.max_len + 1}"
                )
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths together
        out: list[TokenScores | None] = [None] * len(seqs)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="scoring", unit="batch", disable=None if progress else True):
            rows = order[start : start + self.batch_size]
            ids = torch.zeros(len(rows), len(seqs[rows[0]]), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(seqs[i])] = torch.as_tensor(seqs[i])
            ids = ids.to(self.device)
            lp = self._log_probs(ids[:, :-1], [list(seqs[i][:-1]) for i in rows])  # [B, T, V]
            targets = ids[:, 1:]
            target_lp = lp.gather(-1, targets[..., None])[..., 0].cpu().numpy()  # [B, T]
            greedy = (lp.argmax(dim=-1) == targets).cpu().numpy()
            for r, i in enumerate(rows):
                n = len(seqs[i]) - 1
                out[i] = TokenScores(target_lp[r, :n], greedy[r, :n])
        return out

    def token_logprobs(
        self, seqs: Sequence[Sequence[int]], progress: bool = False
    ) -> list[np.ndarray]:
        """``log p(x_t | x_<t)`` for ``t >= 1`` of every sequence: ``[len(s) - 1]`` arrays."""
        return [s.logprobs for s in self.score(seqs, progress)]

    @torch.no_grad()
    def greedy(
        self, prompt: Sequence[int], max_new_tokens: int, until: Sequence[str] = ()
    ) -> list[int]:
        """Greedy continuation of ``prompt``: the new tokens, at most ``max_new_tokens``.

        Stops after EOS, after the decoded continuation contains one of the ``until`` strings, or
        when prompt and continuation fill the model's context.
        """
        if len(prompt) == 0:
            raise ValueError("the prompt is empty: start it with tokenizer.bos_id")
        max_new_tokens = min(max_new_tokens, self.max_len - len(prompt))
        if max_new_tokens <= 0:
            return []

        def stop(new: list[int]) -> bool:
            text = self.tokenizer.decode(new)
            return any(u in text for u in until)

        return self._greedy(list(prompt), max_new_tokens, stop)


class TransformerScorer(Scorer):
    """A single dense or MoE :class:`~moe_lab.nn.model.Transformer`, run in eval mode."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, batch_size: int = 8) -> None:
        moe = model.cfg.moe
        if moe is not None and moe.capacity_factor is not None:
            batch_size = 1  # tokens compete for capacity: a score must not depend on its batch
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.max_len = model.cfg.max_seq_len
        self.device = next(model.parameters()).device

    def _log_probs(self, input_ids: Tensor, inputs: list[list[int]]) -> Tensor:
        return self.model(input_ids).logits.float().log_softmax(dim=-1)

    def _greedy(
        self, prompt: list[int], max_new_tokens: int, stop: Callable[[list[int]], bool]
    ) -> list[int]:
        param = next(self.model.parameters())
        cache = KVCache(self.model.cfg, 1, len(prompt) + max_new_tokens, param.device, param.dtype)
        step, new = torch.tensor([prompt], device=self.device), []
        for _ in range(max_new_tokens):
            token = int(self.model(step, cache=cache).logits[0, -1].float().argmax())
            new.append(token)
            if token == self.tokenizer.eos_id or stop(new):
                break
            step = torch.tensor([[token]], device=self.device)
        return new


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """Token ids of ``context`` and ``continuation``, tokenized as the joined text where possible.

    Whitespace at the end of the context moves to the continuation, and the pair is split where the
    context's own tokens end, so a merge across the boundary (e.g. BPE's " word") is tokenized
    as the model saw it in training (the lm-evaluation-harness convention).
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    ctx = tokenizer.encode(stripped) if stripped else []
    whole = tokenizer.encode(stripped + continuation)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tokenizer.encode(continuation)


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[tuple[list, int]]:
    """Cover ``tokens`` with scored sequences of at most ``max_len + 1`` tokens.

    Every token is predicted exactly once: the first from ``prefix`` (BOS) alone, the others from
    as much context as their window holds; the last window is filled with preceding context
    (lm-evaluation-harness' disjoint rolling windows).

    Returns:
        ``(sequence, n)`` pairs: the last ``n`` token scores of ``sequence`` belong to the text.
    """
    full = [prefix, *tokens]
    windows = []
    for start in range(1, len(full), max_len):  # targets full[start:end]
        end = min(start + max_len, len(full))
        windows.append((full[max(0, end - 1 - max_len) : end], end - start))
    return windows
