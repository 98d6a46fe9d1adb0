"""transformers interop: moe_lab <-> ``LlamaForCausalLM``, in memory or via ``save_pretrained``.

Conversion works on the *on-disk* safetensors key layout
(``model.layers.{i}.self_attn.q_proj.weight``), which transformers has kept stable across v4 and v5.
Both sides use the rotate-half RoPE layout, so ``wq``/``wk`` need no permutation. transformers is
optional: only :func:`to_hf` imports it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from moe_lab.config import ModelConfig, RopeScalingConfig
from moe_lab.model import Transformer, build_model
from moe_lab.weights import load_weights

__all__ = ["SUPPORTED_ARCHITECTURES", "from_hf", "to_hf"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

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
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")


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
    """Rename a transformers Llama state dict to moe_lab names."""
    return {
        _rename(k, _GLOBAL_KEYS, _LAYER_KEYS, _HF_LAYER, "layers.{}.{}.weight"): v
        for k, v in state.items()
    }


def moe_lab_to_hf_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a moe_lab dense state dict to transformers Llama names."""
    inv_global = {v: k for k, v in _GLOBAL_KEYS.items()}
    inv_layer = {v: k for k, v in _LAYER_KEYS.items()}
    return {
        _rename(k, inv_global, inv_layer, _OUR_LAYER, "model.layers.{}.{}.weight"): v
        for k, v in state.items()
    }


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
    )


def config_to_hf(cfg: ModelConfig):
    """A transformers ``LlamaConfig`` with the shape of ``cfg``."""
    from transformers import LlamaConfig

    rope_scaling = None
    if cfg.rope_scaling is not None:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling.factor,
            "low_freq_factor": cfg.rope_scaling.low_freq_factor,
            "high_freq_factor": cfg.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": cfg.rope_scaling.original_max_seq_len,
        }
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden,
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
        attention_bias=False,
        mlp_bias=False,
    )


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("moe_lab.hf needs transformers: pip install 'moe-lab[hf]'") from e
    return transformers


def to_hf(model: Transformer):
    """A ``LlamaForCausalLM`` holding copies of ``model``'s weights, on its dtype and device."""
    transformers = _import_transformers()
    param = next(model.parameters())
    hf_cfg = config_to_hf(model.cfg)
    with torch.device(param.device):
        hf_model = transformers.LlamaForCausalLM(hf_cfg).to(param.dtype)
    state = moe_lab_to_hf_keys({k: v.detach().clone() for k, v in model.state_dict().items()})
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    load_weights(hf_model, state, source="moe_lab model")
    hf_model.tie_weights()
    return hf_model.eval()


def _read_dir(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """config.json and all safetensors tensors of a ``save_pretrained`` directory."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory: no config.json")
    hf_cfg = json.loads(config_file.read_text())
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
        archs = hf_cfg.get("architectures") or [hf_cfg.get("model_type", "unknown")]
        arch = archs[0]
    else:
        hf_cfg, state = source.config.to_dict(), dict(source.state_dict())
        arch = type(source).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    cfg = config_from_hf(hf_cfg)
    state = hf_to_moe_lab_keys(state)
    if cfg.tie_embeddings:  # tied heads are saved once (as the embedding) or aliased in memory
        state.pop("output.weight", None)
    state = {k: v.detach().clone() for k, v in state.items()}
    model = build_model(cfg, device="meta")
    load_weights(model, state, source=f"{arch} weights")
    return model.eval()
