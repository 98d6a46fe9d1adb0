"""transformers interop: moe_lab <-> ``LlamaForCausalLM`` / ``MixtralForCausalLM``, in memory or
via ``save_pretrained`` directories.

Conversion works on the *on-disk* safetensors key layout
(``model.layers.{i}.self_attn.q_proj.weight``), which transformers has kept stable across v4 and v5.
Both sides use the rotate-half RoPE layout, so ``wq``/``wk`` need no permutation. transformers is
optional: only :func:`to_hf` and in-memory Mixtral imports use it.

Mixtral's on-disk experts ``block_sparse_moe.experts.{e}.w1/w3/w2`` are stacked into moe_lab's
MegaBlocks layout (``w1``, ``v1``, ``w2.T`` as ``[E * F, D]``). transformers v5 fuses experts in
memory (``mlp.experts.gate_up_proj``) but still saves the legacy keys, so Mixtral conversion always
goes through a directory and leaves the in-memory layout to transformers' own loader.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from moe_lab.config import ModelConfig, MoEConfig, RopeScalingConfig
from moe_lab.nn.model import Transformer, build_model
from moe_lab.store.checkpoint import read_json
from moe_lab.store.weights import WeightsMismatchError, load_weights

__all__ = ["SUPPORTED_ARCHITECTURES", "from_hf", "to_hf"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MixtralForCausalLM")

_GLOBAL_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_KEYS = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "block_sparse_moe.gate": "feed_forward.router.gate",
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_OUR_EXPERTS = re.compile(r"layers\.(\d+)\.feed_forward\.(w1|v1|w2)")
_EXPERT_NAMES = {"w1": "w1", "w3": "v1", "w2": "w2"}  # Mixtral's per-expert name -> ours


def _rename(
    name: str, global_keys: dict[str, str], layer_keys: dict[str, str], pattern, fmt
) -> str:
    """Map one tensor name; names without a mapping pass through, so strict loading reports them."""
    if name in global_keys:
        return global_keys[name]
    m = pattern.fullmatch(name)
    if m and m.group(2) in layer_keys:
        return fmt.format(m.group(1), layer_keys[m.group(2)])
    return name


def hf_to_moe_lab_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a transformers Llama/Mixtral (on-disk) state dict to moe_lab names and layout."""
    out, experts = {}, {}
    for key, value in state.items():
        m = _HF_EXPERT.fullmatch(key)
        if m:  # collect per-expert matrices, stacked below
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
            continue
        out[_rename(key, _GLOBAL_KEYS, _LAYER_KEYS, _HF_LAYER, "layers.{}.{}.weight")] = value
    for (layer, name), by_expert in experts.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"layer {layer}: experts {sorted(by_expert)} are not 0..E-1")
        mats = [by_expert[e] for e in range(len(by_expert))]
        if name == "w2":  # Mixtral's down projection is [D, F]; MegaBlocks stores it transposed
            mats = [m.t() for m in mats]
        out[f"layers.{layer}.feed_forward.{_EXPERT_NAMES[name]}"] = torch.cat(mats)
    return out


def moe_lab_to_hf_keys(state: dict[str, Tensor], num_experts: int = 0) -> dict[str, Tensor]:
    """Rename a moe_lab state dict to transformers (on-disk) Llama/Mixtral names and layout."""
    inv_global = {v: k for k, v in _GLOBAL_KEYS.items()}
    inv_layer = {v: k for k, v in _LAYER_KEYS.items()}
    inv_expert = {v: k for k, v in _EXPERT_NAMES.items()}
    out = {}
    for key, value in state.items():
        m = _OUR_EXPERTS.fullmatch(key)
        if m:
            for e, mat in enumerate(value.chunk(num_experts)):  # [F, D] per expert
                mat = mat.t() if m.group(2) == "w2" else mat
                name = f"model.layers.{m.group(1)}.block_sparse_moe.experts.{e}"
                out[f"{name}.{inv_expert[m.group(2)]}.weight"] = mat.contiguous()
        elif not key.endswith("router.expert_bias"):  # Mixtral has no selection bias
            out[_rename(key, inv_global, inv_layer, _OUR_LAYER, "model.layers.{}.{}.weight")] = (
                value
            )
    return out


def _unsupported(what: str) -> ValueError:
    return ValueError(f"cannot convert this transformers model: {what}")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from a transformers Llama ``config.json`` dict (v4 or v5 layout)."""
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise _unsupported(f"{flag}=True (moe_lab's Llama has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(f"hidden_act={hf['hidden_act']!r} (only silu/SwiGLU)")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // n_heads):
        raise _unsupported(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads")
    # transformers v5 folds rope_theta and rope_scaling into one `rope_parameters` dict.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise _unsupported(f"rope_type={rope_type!r} (supported: default, llama3)")
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScalingConfig(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_seq_len=int(rope["original_max_position_embeddings"]),
        )
    kv_heads = hf.get("num_key_value_heads") or n_heads
    moe = None
    if hf.get("model_type") == "mixtral" or "num_local_experts" in hf:
        if hf.get("sliding_window") is not None:
            raise _unsupported(f"sliding_window={hf['sliding_window']} (moe_lab attends fully)")
        moe = MoEConfig(
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            expert_hidden=hf["intermediate_size"],
            renormalize=True,  # Mixtral: softmax over all experts, top-k, renormalise
            jitter=float(hf.get("router_jitter_noise") or 0.0),
            lbl="mixtral",
            lbl_weight=float(hf.get("router_aux_loss_coef", 0.001)),
            z_loss_weight=0.0,
        )
    return ModelConfig(
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if kv_heads == n_heads else kv_heads,
        vocab_size=hf["vocab_size"],
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        rope_theta=float(theta),
        rope_scaling=scaling,
        norm_eps=float(hf["rms_norm_eps"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        moe=moe,
    )


def _mixtral_problems(cfg: ModelConfig) -> list[str]:
    """Why an MoE config cannot be expressed as Mixtral (empty: it can)."""
    moe = cfg.moe
    checks = [
        (moe.every == 1, f"model.moe.every={moe.every} (Mixtral: every layer is MoE)"),
        (moe.score == "softmax", f"model.moe.score={moe.score!r} (Mixtral: softmax)"),
        (moe.renormalize, "model.moe.renormalize=false (Mixtral renormalises the top-k)"),
        (moe.capacity_factor is None, "model.moe.capacity_factor set (Mixtral is dropless)"),
        (moe.shared_expert_hidden == 0, "model.moe.shared_expert_hidden > 0 (no shared expert)"),
        (moe.bias_update_rate == 0, "model.moe.bias_update_rate > 0 (no selection bias)"),
        # transformers' router_jitter_noise also perturbs the experts' input; ours only the router's
        (moe.jitter == 0, "model.moe.jitter > 0 (Mixtral's jitter also scales the expert input)"),
    ]
    return [why for ok, why in checks if not ok]


def config_to_hf(cfg: ModelConfig):
    """A transformers ``LlamaConfig`` (dense) or ``MixtralConfig`` (MoE) with the shape of ``cfg``.

    Raises:
        ValueError: the MoE settings have no Mixtral equivalent (each reason listed).
    """
    from transformers import LlamaConfig, MixtralConfig

    rope_scaling = None
    if cfg.rope_scaling is not None:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling.factor,
            "low_freq_factor": cfg.rope_scaling.low_freq_factor,
            "high_freq_factor": cfg.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": cfg.rope_scaling.original_max_seq_len,
        }
    shared = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        hidden_act="silu",
    )
    if cfg.moe is None:
        return LlamaConfig(
            **shared, intermediate_size=cfg.ffn_hidden, attention_bias=False, mlp_bias=False
        )
    problems = _mixtral_problems(cfg)
    if problems:
        raise ValueError("this MoE cannot be expressed as Mixtral: " + "; ".join(problems))
    return MixtralConfig(
        **shared,
        intermediate_size=cfg.moe.expert_hidden,
        num_local_experts=cfg.moe.num_experts,
        num_experts_per_tok=cfg.moe.top_k,
        router_jitter_noise=cfg.moe.jitter,
        router_aux_loss_coef=cfg.moe.lbl_weight,
        sliding_window=None,
    )


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("moe_lab.interop.hf needs transformers: pip install 'moe-lab[hf]'") from e
    return transformers


def to_hf(model: Transformer):
    """A ``LlamaForCausalLM`` (dense) or ``MixtralForCausalLM`` (MoE) holding copies of ``model``'s
    weights, on its dtype and device.

    Raises:
        ValueError: an MoE that Mixtral cannot express (the reasons are listed).
    """
    transformers = _import_transformers()
    param = next(model.parameters())
    hf_cfg = config_to_hf(model.cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.cfg.moe is None:
        with torch.device(param.device):
            hf_model = transformers.LlamaForCausalLM(hf_cfg).to(param.dtype)
        state = moe_lab_to_hf_keys(state)
        if model.cfg.tie_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        load_weights(hf_model, state, source="moe_lab model")
        hf_model.tie_weights()
        return hf_model.eval()
    if any(v.any() for k, v in state.items() if k.endswith("router.expert_bias")):
        raise ValueError(
            "this MoE cannot be expressed as Mixtral: its routers carry a selection bias"
        )
    state = moe_lab_to_hf_keys(state, model.cfg.moe.num_experts)
    with tempfile.TemporaryDirectory() as tmp:
        hf_cfg.save_pretrained(tmp)
        save_file(
            {k: v.cpu() for k, v in state.items()},
            f"{tmp}/model.safetensors",
            metadata={"format": "pt"},
        )
        hf_model, info = transformers.MixtralForCausalLM.from_pretrained(
            tmp, output_loading_info=True
        )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise WeightsMismatchError(f"transformers did not load every tensor: {problems}")
    return hf_model.to(device=param.device, dtype=param.dtype).eval()


def _read_dir(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """config.json and all safetensors tensors of a ``save_pretrained`` directory."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory: no config.json")
    hf_cfg = read_json(config_file)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path} has no safetensors weights; moe_lab never unpickles .bin files. "
            "Re-save with save_pretrained(..., safe_serialization=True)."
        )
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(load_file(path / shard))
    return hf_cfg, state


def from_hf(source: Any) -> Transformer:
    """A moe_lab model from a transformers model or a directory written by ``save_pretrained``.

    Raises:
        ValueError: the architecture or one of its options is not supported (the supported
            architectures are listed), or the weights do not fit the configuration.
    """
    if isinstance(source, (str, Path)):
        hf_cfg, state = _read_dir(Path(source))
        arch = (hf_cfg.get("architectures") or [hf_cfg.get("model_type", "unknown")])[0]
    else:
        arch = type(source).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if arch == "MixtralForCausalLM" and not isinstance(source, (str, Path)):
        with tempfile.TemporaryDirectory() as tmp:  # the stable on-disk layout, see module doc
            source.save_pretrained(tmp)
            hf_cfg, state = _read_dir(Path(tmp))
    elif not isinstance(source, (str, Path)):
        hf_cfg, state = source.config.to_dict(), dict(source.state_dict())
    cfg = config_from_hf(hf_cfg)
    state = hf_to_moe_lab_keys(state)
    if cfg.tie_embeddings:  # tied heads are saved once (as the embedding) or aliased in memory
        state.pop("output.weight", None)
    state = {k: v.detach().clone() for k, v in state.items()}
    model = build_model(cfg, device="meta")
    for name, buffer in model.state_dict().items():
        if name.endswith("router.expert_bias"):  # Mixtral has none: selection is unbiased
            state.setdefault(name, torch.zeros(buffer.shape))
    load_weights(model, state, source=f"{arch} weights")
    return model.eval()
