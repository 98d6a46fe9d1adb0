"""The transformers architectures moe_lab converts, as data: each one's tensor names, what it can
express, and its ``config.json`` fields in both directions.

Every family here is the Llama backbone with options (:class:`~moe_lab.config.ModelConfig`):

============================  ========  ===========  ==========  ================================
architecture                  qk-norm   norms        biases      FFN
============================  ========  ===========  ==========  ================================
``LlamaForCausalLM``          none      pre          none | all  SwiGLU
``MixtralForCausalLM``        none      pre          none        top-k MoE, renormalised
``OlmoeForCausalLM``          proj.     pre          none | all  top-k MoE
``Qwen2MoeForCausalLM``       none      pre          none | qkv  MoE + sigmoid-gated shared expert,
                                                                 dense layers by pattern
``Qwen3MoeForCausalLM``       head      pre          none | all  MoE, dense layers by pattern
``FlexOlmoForCausalLM``       proj.     post         none | all  top-k MoE
============================  ========  ===========  ==========  ================================

Each family's MoE routes as moe_lab's softmax router does (softmax over all experts in fp32, top-k,
renormalised or not) and its auxiliary loss is Mixtral's, moe_lab's ``lbl: mixtral``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_lab.config import ModelConfig, MoEConfig, RopeScalingConfig

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture_of",
    "config_from_hf",
    "config_to_hf",
    "problems",
    "target_architecture",
]

_ATTENTION = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
}
_MLP = {"mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2"}  # fmt: skip
_PRE_NORMS = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
_POST_NORMS = {
    "post_attention_layernorm": "attention_norm",
    "post_feedforward_layernorm": "ffn_norm",
}
_ROUTER = {"mlp.gate": "feed_forward.router.gate"}
_SHARED_EXPERT = {
    "mlp.shared_expert.gate_proj": "feed_forward.shared.w1",
    "mlp.shared_expert.up_proj": "feed_forward.shared.w3",
    "mlp.shared_expert.down_proj": "feed_forward.shared.w2",
    "mlp.shared_expert_gate": "feed_forward.shared_gate",
}


@dataclass(frozen=True)
class Architecture:
    """One transformers ``*ForCausalLM`` class: its names and what it can express."""

    name: str  # the transformers class
    model_type: str  # config.json's model_type
    config_class: str
    layer_keys: dict[str, str]  # transformers sub-module of a layer -> ours (weight and bias)
    experts: str | None = None  # sub-module holding experts 0..E-1 on disk; None: dense
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    qk_norm: str = "none"
    norm_position: str = "pre"
    biases: tuple[str, ...] = ("none", "all")  # the attention_bias values it expresses
    free_head_dim: bool = True  # head_dim may differ from dim / n_heads
    layer_pattern: bool = False  # dense layers among MoE layers (decoder_sparse_step, ...)
    gated_shared_expert: bool = False  # has one (and must)
    renormalize: tuple[bool, ...] = (True, False)
    moe_fields: dict[str, str] = field(default_factory=dict)  # MoEConfig field -> config key


_OLMOE_MOE = {"num_experts": "num_experts", "expert_hidden": "intermediate_size",
              "renormalize": "norm_topk_prob"}  # fmt: skip
_QWEN_MOE = {"num_experts": "num_experts", "expert_hidden": "moe_intermediate_size",
             "renormalize": "norm_topk_prob"}  # fmt: skip

ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("LlamaForCausalLM", "llama", "LlamaConfig", _ATTENTION | _MLP | _PRE_NORMS),
        Architecture(
            "MixtralForCausalLM",
            "mixtral",
            "MixtralConfig",
            _ATTENTION | _PRE_NORMS | {"block_sparse_moe.gate": "feed_forward.router.gate"},
            experts="block_sparse_moe.experts",
            expert_names=("w1", "w3", "w2"),
            biases=("none",),
            renormalize=(True,),
            moe_fields={"num_experts": "num_local_experts", "expert_hidden": "intermediate_size"},
        ),
        Architecture(
            "OlmoeForCausalLM",
            "olmoe",
            "OlmoeConfig",
            _ATTENTION | _PRE_NORMS | _ROUTER,
            experts="mlp.experts",
            qk_norm="projection",
            free_head_dim=False,
            moe_fields=_OLMOE_MOE,
        ),
        Architecture(
            "Qwen2MoeForCausalLM",
            "qwen2_moe",
            "Qwen2MoeConfig",
            _ATTENTION | _MLP | _PRE_NORMS | _ROUTER | _SHARED_EXPERT,
            experts="mlp.experts",
            biases=("none", "qkv"),
            layer_pattern=True,
            gated_shared_expert=True,
            moe_fields=_QWEN_MOE,
        ),
        Architecture(
            "Qwen3MoeForCausalLM",
            "qwen3_moe",
            "Qwen3MoeConfig",
            _ATTENTION | _MLP | _PRE_NORMS | _ROUTER,
            experts="mlp.experts",
            qk_norm="head",
            layer_pattern=True,
            moe_fields=_QWEN_MOE,
        ),
        Architecture(
            "FlexOlmoForCausalLM",
            "flex_olmo",
            "FlexOlmoConfig",
            _ATTENTION | _POST_NORMS | _ROUTER,
            experts="mlp.experts",
            qk_norm="projection",
            norm_position="post",
            moe_fields=_OLMOE_MOE,
        ),
    )  # fmt: skip
}
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}


def _unsupported(what: str) -> ValueError:
    return ValueError(f"cannot convert this transformers model: {what}")


def architecture_of(hf: dict[str, Any]) -> Architecture:
    """The architecture of a ``config.json`` dict, by its ``architectures`` or ``model_type``."""
    names = hf.get("architectures") or []
    arch = ARCHITECTURES.get(names[0]) if names else _BY_MODEL_TYPE.get(hf.get("model_type"))
    if arch is None:
        found = names[0] if names else hf.get("model_type", "unknown")
        raise ValueError(
            f"unsupported architecture {found!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    return arch


def _refuse_options(hf: dict[str, Any], arch: Architecture) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(f"hidden_act={hf['hidden_act']!r} (only silu/SwiGLU)")
    if hf.get("mlp_bias"):
        raise _unsupported("mlp_bias=True (moe_lab's FFNs have no biases)")
    if hf.get("clip_qkv") is not None:
        raise _unsupported(f"clip_qkv={hf['clip_qkv']} (moe_lab does not clip q, k, v)")
    sliding = hf.get("use_sliding_window") or (
        arch.model_type == "mixtral" and hf.get("sliding_window") is not None
    )
    if sliding or any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise _unsupported(f"sliding_window={hf.get('sliding_window')} (moe_lab attends fully)")


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScalingConfig | None]:
    # transformers v5 folds rope_theta and rope_scaling into one `rope_parameters` dict.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise _unsupported(f"rope_type={rope_type!r} (supported: default, llama3)")
    if rope_type == "default":
        return theta, None
    return theta, RopeScalingConfig(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_seq_len=int(rope["original_max_position_embeddings"]),
    )


def _moe_from_hf(hf: dict[str, Any], arch: Architecture) -> MoEConfig:
    get = {ours: hf.get(theirs) for ours, theirs in arch.moe_fields.items()}
    # Qwen3-MoE's config writes num_experts under Mixtral's name
    num_experts = get["num_experts"] or hf.get("num_local_experts") or hf.get("num_experts")
    if not num_experts:
        raise _unsupported("num_experts=0 (a dense model: convert it as LlamaForCausalLM)")
    return MoEConfig(
        num_experts=num_experts,
        top_k=hf["num_experts_per_tok"],
        expert_hidden=get["expert_hidden"],
        renormalize=bool(get["renormalize"]) if "renormalize" in get else True,
        every=int(hf.get("decoder_sparse_step") or 1),
        dense_layers=list(hf.get("mlp_only_layers") or []),
        shared_expert_hidden=int(hf.get("shared_expert_intermediate_size") or 0),
        shared_expert_gate=arch.gated_shared_expert,
        jitter=float(hf.get("router_jitter_noise") or 0.0),
        lbl="mixtral",
        lbl_weight=float(hf.get("router_aux_loss_coef", 0.001)),
        z_loss_weight=0.0,
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from a transformers ``config.json`` dict (v4 or v5 layout) of one
    of :data:`ARCHITECTURES`, recording the architecture in ``hf_architecture``.

    Raises:
        ValueError: the architecture or one of its options is not supported (named).
    """
    arch = architecture_of(hf)
    _refuse_options(hf, arch)
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim in (None, dim // n_heads):
        head_dim = None
    elif not arch.free_head_dim:
        raise _unsupported(f"head_dim={head_dim} != hidden_size / num_attention_heads")
    if arch.model_type == "qwen2_moe":
        bias = "qkv" if hf.get("qkv_bias", True) else "none"
    else:
        bias = "all" if hf.get("attention_bias") else "none"
    theta, scaling = _rope_from_hf(hf)
    kv_heads = hf.get("num_key_value_heads") or n_heads
    return ModelConfig(
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if kv_heads == n_heads else kv_heads,
        head_dim=head_dim,
        vocab_size=hf["vocab_size"],
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf["rms_norm_eps"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        qk_norm=arch.qk_norm,
        attention_bias=bias,
        norm_position=arch.norm_position,
        hf_architecture=arch.name,
        moe=_moe_from_hf(hf, arch) if arch.experts else None,
    )


def problems(cfg: ModelConfig, arch: Architecture) -> list[str]:
    """Why ``cfg`` cannot be expressed as ``arch`` (empty: it can), each naming the field."""
    short = arch.name.removesuffix("ForCausalLM")
    checks = [
        (cfg.qk_norm == arch.qk_norm, f"model.qk_norm={cfg.qk_norm!r} ({short}: {arch.qk_norm})"),
        (
            cfg.norm_position == arch.norm_position,
            f"model.norm_position={cfg.norm_position!r} ({short}: {arch.norm_position})",
        ),
        (
            cfg.attention_bias in arch.biases,
            f"model.attention_bias={cfg.attention_bias!r} ({short}: {' or '.join(arch.biases)})",
        ),
        (
            arch.free_head_dim or cfg.head_size * cfg.n_heads == cfg.dim,
            f"model.head_dim={cfg.head_dim} ({short}: dim / n_heads)",
        ),
    ]
    moe = cfg.moe
    if moe is None or arch.experts is None:
        kind = "an MoE" if arch.experts else "a dense model"
        checks.append((moe is None and arch.experts is None, f"model.moe ({short} is {kind})"))
        return [why for ok, why in checks if not ok]
    checks += [
        (moe.score == "softmax", f"model.moe.score={moe.score!r} ({short}: softmax)"),
        (
            moe.renormalize in arch.renormalize,
            f"model.moe.renormalize={str(moe.renormalize).lower()} ({short} renormalises)",
        ),
        (moe.capacity_factor is None, f"model.moe.capacity_factor set ({short} is dropless)"),
        (moe.bias_update_rate == 0, "model.moe.bias_update_rate > 0 (no selection bias)"),
        (not moe.always_selected, "model.moe.always_selected (top-k by score alone)"),
        # transformers' router_jitter_noise also perturbs the experts' input; ours only the router's
        (moe.jitter == 0, "model.moe.jitter > 0 (transformers' jitter also scales the input)"),
        (
            arch.layer_pattern or (moe.every == 1 and not moe.dense_layers),
            f"model.moe.every={moe.every}, dense_layers={moe.dense_layers} "
            f"({short}: every layer is MoE)",
        ),
        (
            (moe.shared_expert_hidden > 0 and moe.shared_expert_gate)
            if arch.gated_shared_expert
            else moe.shared_expert_hidden == 0,
            f"model.moe.shared_expert_hidden={moe.shared_expert_hidden}, shared_expert_gate="
            f"{str(moe.shared_expert_gate).lower()} ({short}: "
            + ("a sigmoid-gated shared expert)" if arch.gated_shared_expert else "none)"),
        ),
    ]
    return [why for ok, why in checks if not ok]


def target_architecture(cfg: ModelConfig, architecture: str | None = None) -> Architecture:
    """``architecture``, else the one ``cfg`` was imported from, else Llama for a dense model and
    Mixtral for an MoE.

    Raises:
        ValueError: an architecture not in :data:`ARCHITECTURES`.
    """
    name = architecture or cfg.hf_architecture
    name = name or ("LlamaForCausalLM" if cfg.moe is None else "MixtralForCausalLM")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def config_to_hf(cfg: ModelConfig, architecture: str | None = None):
    """A transformers config of ``architecture`` (default: ``cfg.hf_architecture``, else Llama
    for a dense model and Mixtral for an MoE) with the shape of ``cfg``.

    Raises:
        ValueError: an unknown architecture, or settings it cannot express (each one named).
    """
    import transformers

    arch = target_architecture(cfg, architecture)
    name = arch.name
    why = problems(cfg, arch)
    if why:
        raise ValueError(f"this model cannot be expressed as {name}: " + "; ".join(why))
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope |= {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                 "high_freq_factor": s.high_freq_factor,
                 "original_max_position_embeddings": s.original_max_seq_len}  # fmt: skip
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        hidden_act="silu",
        intermediate_size=cfg.ffn_hidden,
        # the tokenizer's ids are not the model's to know (export_run sets them); the families'
        # defaults (FlexOlmo's pad 100277, OLMoE's eos 50279) lie outside a small vocabulary
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    if arch.free_head_dim:
        kwargs["head_dim"] = cfg.head_size
    if arch.model_type == "qwen2_moe":
        kwargs |= dict(qkv_bias=cfg.attention_bias == "qkv", use_sliding_window=False)
    elif arch.model_type != "mixtral":
        kwargs["attention_bias"] = cfg.attention_bias == "all"
    moe = cfg.moe
    if moe is not None:
        for ours, theirs in arch.moe_fields.items():
            kwargs[theirs] = getattr(moe, ours)
        kwargs |= dict(num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.lbl_weight)
        if arch.layer_pattern:
            kwargs |= dict(decoder_sparse_step=moe.every, mlp_only_layers=list(moe.dense_layers))
        if arch.gated_shared_expert:
            kwargs["shared_expert_intermediate_size"] = moe.shared_expert_hidden
        if arch.model_type == "mixtral":
            kwargs |= dict(router_jitter_noise=0.0, sliding_window=None)
    return getattr(transformers, arch.config_class)(**kwargs)
