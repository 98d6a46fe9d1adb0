"""Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lab.nn.model import KVCache, Transformer

__all__ = ["generate", "sample_next"]


def sample_next(
    logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None
) -> Tensor:
    """Pick the next token from ``logits [B, V]``: argmax when ``temperature == 0``, else sample.

    Nucleus sampling (Holtzman et al. 2020) keeps the smallest set of tokens whose probability mass
    reaches ``top_p``; the most likely token is always kept.
    """
    if not temperature >= 0 or not 0 < top_p <= 1:  # `not >=`: NaN fails too
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = (
            sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        )  # mass before this token already enough
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Continue ``prompt [B, T0]`` by up to ``max_new_tokens`` tokens; returns ``[B, T0 + n]``.

    Runs the model in eval mode (restoring its previous mode). Rows that emit ``eos_id`` keep
    emitting it; generation stops early once every row has. ``use_cache=False`` recomputes the
    whole sequence at every step, the slow reference the cache is tested against.
    """
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(
            f"prompt must be a non-empty [batch, tokens] tensor, got {tuple(prompt.shape)}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"model.max_seq_len ({model.cfg.max_seq_len})"
        )
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    cache = (
        KVCache(model.cfg, prompt.shape[0], total, param.device, param.dtype) if use_cache else None
    )
    seq, step_input = prompt, prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else seq, cache=cache).logits[:, -1]
        token = sample_next(logits, temperature, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        seq = torch.cat([seq, token[:, None]], dim=1)
        step_input = token[:, None]
        if eos_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return seq
