"""One scoring interface for every moe_lab model: token log-probabilities and greedy continuation.

A :class:`Scorer` turns token sequences into ``log p(x_t | x_<t)`` for ``t >= 1`` and continues a
prompt greedily. Few-shot scoring (:mod:`moe_lab.fewshot`) and the lm-evaluation-harness adapter
(:mod:`moe_lab.harness`) are written against it, so they work unchanged for

- a single :class:`~moe_lab.model.Transformer`, dense or MoE (also an information-flow-control
  model in MoE form, whose routers only see the permitted experts): :class:`TransformerScorer`;
- a routed :class:`~moe_lab.experts.ensemble.ExpertEnsemble`: :class:`EnsembleScorer`, with a
  :class:`Routing` that weighs the experts at every position from the context so far (C-BTM prefix
  routing through the clusterer, uniform, or one expert for an X-ELM language).

:func:`load_scorer` recognises the three kinds of directory ``moe-lab eval`` takes.

Shapes: B = sequences, T = positions, V = vocabulary, E = experts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from moe_lab.config import Config, ConfigError, load_config
from moe_lab.experts.ensemble import ExpertEnsemble, cluster_router, generate_ensemble
from moe_lab.model import KVCache, Transformer
from moe_lab.routing.cluster import ClusterRouter
from moe_lab.tokenizer import Tokenizer

__all__ = [
    "EnsembleScorer",
    "FixedRouting",
    "PrefixRouting",
    "Routing",
    "Scorer",
    "TokenScores",
    "TransformerScorer",
    "encode_pair",
    "ensemble_routing",
    "load_ifc_dir",
    "load_scorer",
    "rolling_windows",
]

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
    """A single dense or MoE :class:`~moe_lab.model.Transformer`, run in eval mode."""

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
    complete word (:meth:`~moe_lab.routing.cluster.ClusterRouter.prefix_weights`)."""

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
    """An :class:`~moe_lab.experts.ensemble.ExpertEnsemble` mixed per position by ``routing``;
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


def ensemble_routing(
    run_dir: str | Path, cfg: Config, names: list[str], tokenizer: Tokenizer, lang: str | None
) -> Routing:
    """How a ``train_experts`` / X-ELM directory's experts are weighed for scoring and generation.

    ``lang``: the expert of that language, or of its most similar one (X-ELM). Otherwise
    ``cfg.ensemble``: prefix routing through ``ensemble.clusters_dir``'s clusterer, or uniform for
    ``routing=uniform`` and when no clusterer is configured.
    """
    E = len(names)
    if lang is not None:
        from moe_lab.xelm import expert_for

        return FixedRouting(np.eye(E)[names.index(expert_for(run_dir, lang))])
    if cfg.ensemble.routing == "uniform" or cfg.ensemble.clusters_dir is None:
        return FixedRouting.uniform(E)
    return PrefixRouting(cluster_router(cfg.ensemble, E), tokenizer)


def load_ifc_dir(run_dir: str | Path, principal: str | None, policy, device: str = "cpu"):
    """What ``principal`` may run under ``policy`` (an :class:`~moe_lab.ifc.AccessPolicy` or its
    file) of an information-flow-control directory (an :class:`~moe_lab.ifc.IFCModel`), or None
    for any other directory.

    Raises:
        ConfigError: an IFC directory without a principal and a policy.
    """
    manifest = Path(run_dir) / "manifest.json"
    if not manifest.is_file() or "domain_field" not in json.loads(manifest.read_text()):
        return None
    if principal is None or policy is None:
        raise ConfigError(
            f"{run_dir} is an information-flow-control run: pass --principal and --policy"
        )
    from moe_lab.ifc import AccessPolicy, load_ifc

    if not isinstance(policy, AccessPolicy):
        policy = AccessPolicy.load(policy)
    return load_ifc(run_dir, policy, principal, device)


def load_scorer(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    principal: str | None = None,
    policy=None,
    lang: str | None = None,
    device: str = "cpu",
    batch_size: int = 8,
) -> Scorer:
    """A scorer for any directory ``moe-lab eval`` takes.

    - an information-flow-control run (``manifest.json`` with a ``domain_field``): what
      ``principal`` may run under ``policy`` (required), loaded by :func:`~moe_lab.ifc.load_ifc`;
      the ensemble form mixes the permitted experts uniformly;
    - a directory of experts (``manifest.json``): routed per ``ensemble.*`` of its config.yaml
      (``average`` scores the parameter-averaged model), or by ``lang`` (X-ELM);
    - a training run (``config.yaml`` + checkpoints).

    Args:
        overrides: ``key=value`` changes to the saved config (e.g. ``ensemble.routing=uniform``).
        policy: an :class:`~moe_lab.ifc.AccessPolicy` or the path of its file.
    """
    run = Path(run_dir)
    ifc = load_ifc_dir(run, principal, policy, device)
    if ifc is not None:
        if ifc.model is not None:
            return TransformerScorer(ifc.model.to(device), ifc.tokenizer, batch_size)
        routing = FixedRouting.uniform(len(ifc.experts))
        return EnsembleScorer(ExpertEnsemble(ifc.experts), routing, ifc.tokenizer, batch_size)
    if (run / "manifest.json").is_file():
        from moe_lab.btm import average, load_experts
        from moe_lab.tokenizer import load_tokenizer

        cfg = load_config(run / "config.yaml", overrides)
        names, experts = load_experts(run, device=device)
        tokenizer = load_tokenizer(run / "experts" / names[0] / "run" / "tokenizer")
        if lang is None and cfg.ensemble.routing == "average":
            return TransformerScorer(average(experts), tokenizer, batch_size)
        if lang is None and cfg.ensemble.routing == "oracle":
            raise ConfigError(
                "ensemble.routing=oracle routes by the whole document, answer included: "
                "score with ensemble.routing=prefix or uniform"
            )
        routing = ensemble_routing(run, cfg, names, tokenizer, lang)
        ensemble = ExpertEnsemble(experts, cfg.ensemble.mix)
        return EnsembleScorer(ensemble, routing, tokenizer, batch_size)
    if lang is not None:
        raise ConfigError(f"{run} is a single model: --lang applies to X-ELM expert directories")
    from moe_lab.checkpoint import load_run

    _, model, tokenizer = load_run(run, list(overrides), device=device)
    return TransformerScorer(model, tokenizer, batch_size)


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
