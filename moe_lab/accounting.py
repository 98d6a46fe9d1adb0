"""Parameters and FLOPs per token from a config alone, without building the model.

What is counted (one multiply-add = 2 FLOPs):

* ``total_params``: every parameter, a tied embedding once; ``sum(p.numel())`` of the built model.
* ``active_params``: parameters a token touches: for a dense model all of them; an MoE layer
  counts its router, its shared expert and k of its E experts (capacity drops are not subtracted).
* ``matmul_params``: parameters that take part in a matrix multiply per token: attention and FFN
  projections plus the output head (also when tied). The input embedding is a lookup and RMSNorm is
  elementwise, so neither costs matmul FLOPs.
* ``forward_flops_per_token = 2 * matmul_params + 4 * n_layers * seq_len * n_heads * head_dim``:
  the second term is ``Q K^T`` and ``softmax(.) V`` over the full ``seq_len x seq_len`` square, the
  convention of PaLM (appendix B) and nanoGPT's ``estimate_mfu``. Causal masking is not subtracted:
  it is what the math kernel computes, and what keeps the count independent of the kernel chosen.
* ``train_flops_per_token = 3 * forward`` (backward costs twice the forward), i.e.
  ``6 N + 12 L T d_attn`` (Kaplan et al. 2020).
* ``inference_flops_per_token``: one forward pass per token at context ``seq_len``.

Elementwise work (norms, activations, softmax, RoPE) is left out; it is below 1% of the total at
every preset shape and is what FlopCounterMode leaves out too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from moe_lab.config import ModelConfig, MoEConfig

__all__ = ["ComputeEstimate", "ensemble", "estimate", "matched_moe"]


@dataclass(frozen=True)
class ComputeEstimate:
    total_params: int
    active_params: int
    embedding_params: int
    matmul_params: int
    seq_len: int
    forward_flops_per_token: float
    train_flops_per_token: float
    inference_flops_per_token: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def matched_moe(dense: ModelConfig, num_experts: int, top_k: int, **moe_fields) -> ModelConfig:
    """An MoE variant of ``dense`` with the same active FFN FLOPs per token.

    Each expert is ``ffn_hidden / top_k`` wide, so k experts cost what the dense FFN costs (plus
    the router, ``2 * dim * E`` FLOPs per token and layer). ``top_k=1`` gives Switch-style experts
    as wide as the dense FFN: equal FLOPs, ``E`` times the FFN parameters; larger ``top_k`` gives
    finer-grained experts (OLMoE, DeepSeek-MoE) at the same FLOPs.
    """
    if dense.ffn_hidden % top_k:
        raise ValueError(f"ffn_hidden ({dense.ffn_hidden}) is not divisible by top_k ({top_k})")
    moe = MoEConfig(
        num_experts=num_experts, top_k=top_k, expert_hidden=dense.ffn_hidden // top_k, **moe_fields
    )
    cfg = replace(dense, moe=moe)
    cfg.validate()
    return cfg


def estimate(cfg: ModelConfig, seq_len: int | None = None) -> ComputeEstimate:
    """Parameter and FLOP counts of ``cfg`` at context length ``seq_len`` (default: max_seq_len).

    Args:
        cfg: model shape; validated first.
        seq_len: tokens of context each token attends over (the training sequence length).

    Returns:
        A :class:`ComputeEstimate`; see the module docstring for exactly what each field counts.
    """
    cfg.validate()
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    forward = cfg.forward_flops_per_token(seq_len)
    return ComputeEstimate(
        total_params=cfg.num_params(),
        active_params=cfg.num_active_params(),
        embedding_params=cfg.vocab_size * cfg.dim,
        matmul_params=cfg.matmul_params(),
        seq_len=seq_len,
        forward_flops_per_token=forward,
        train_flops_per_token=3 * forward,
        inference_flops_per_token=forward,
    )


def ensemble(member: ComputeEstimate, experts: int, active: int) -> ComputeEstimate:
    """An ensemble of ``experts`` models shaped like ``member``, ``active`` of which run per token
    (C-BTM's top-k, X-ELM's one expert per language, IFC's permitted experts): parameters of all
    of them, active parameters and inference FLOPs of the ``active`` ones. Sequence routing (a
    tf-idf vector per context) is not counted."""
    return replace(
        member,
        total_params=experts * member.total_params,
        active_params=active * member.active_params,
        inference_flops_per_token=active * member.inference_flops_per_token,
    )
