"""transformers interop: moe_lab <-> the architectures of
:mod:`moe_lab.interop.hf_architectures` (Llama, Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, FlexOlmo), in
memory or via ``save_pretrained`` directories.

Conversion works on the *on-disk* safetensors key layout
(``model.layers.{i}.self_attn.q_proj.weight``), which transformers has kept stable across v4 and v5.
Both sides use the rotate-half RoPE layout, so ``wq``/``wk`` need no permutation. transformers is
optional: only :func:`to_hf` and in-memory MoE imports use it.

On disk, experts are one tensor each (``mlp.experts.{e}.gate_proj``, Mixtral's
``block_sparse_moe.experts.{e}.w1``); they are stacked into moe_lab's MegaBlocks layout (``w1``,
``v1``, ``w2.T`` as ``[E * F, D]``). transformers v5 fuses experts in memory
(``mlp.experts.gate_up_proj``) but still loads and saves the per-expert keys, so MoE conversion
always goes through a directory and leaves the in-memory layout to transformers' own loader.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from moe_lab.interop.hf_architectures import (
    ARCHITECTURES,
    Architecture,
    architecture_of,
    config_from_hf,
    config_to_hf,
    target_architecture,
)
from moe_lab.nn.model import Transformer, build_model
from moe_lab.store.checkpoint import read_json
from moe_lab.store.weights import WeightsMismatchError, load_weights

__all__ = ["SUPPORTED_ARCHITECTURES", "config_from_hf", "config_to_hf", "from_hf", "to_hf"]

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

_GLOBAL_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")
_OUR_EXPERTS = re.compile(r"layers\.(\d+)\.feed_forward\.(w1|v1|w2)")
_OUR_EXPERT_NAMES = ("w1", "v1", "w2")  # gate, up, down: the order of Architecture.expert_names


def _rename(name: str, global_keys: dict[str, str], layer_keys: dict[str, str], pattern) -> str:
    """Map one tensor name; names without a mapping pass through, so strict loading reports them."""
    if name in global_keys:
        return global_keys[name]
    m = pattern.fullmatch(name)
    if m and m.group(2) in layer_keys:
        prefix = "model.layers" if pattern is _OUR_LAYER else "layers"
        return f"{prefix}.{m.group(1)}.{layer_keys[m.group(2)]}.{m.group(3)}"
    return name


def hf_to_moe_lab_keys(state: dict[str, Tensor], arch: Architecture) -> dict[str, Tensor]:
    """Rename an ``arch`` (on-disk) state dict to moe_lab names, stacking each layer's experts
    into moe_lab's ``[E * F, D]`` layout."""
    out, experts = {}, {}
    expert_key = None
    if arch.experts:
        names = "|".join(arch.expert_names)
        expert_key = re.compile(
            rf"model\.layers\.(\d+)\.{re.escape(arch.experts)}\.(\d+)\.({names})\.weight"
        )
    for key, value in state.items():
        m = expert_key.fullmatch(key) if expert_key else None
        if m:  # collect per-expert matrices, stacked below
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
            continue
        out[_rename(key, _GLOBAL_KEYS, arch.layer_keys, _HF_LAYER)] = value
    ours = dict(zip(arch.expert_names, _OUR_EXPERT_NAMES, strict=True))
    for (layer, name), by_expert in experts.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"layer {layer}: experts {sorted(by_expert)} are not 0..E-1")
        mats = [by_expert[e] for e in range(len(by_expert))]
        if ours[name] == "w2":  # the down projection is [D, F]; MegaBlocks stores it transposed
            mats = [m.t() for m in mats]
        out[f"layers.{layer}.feed_forward.{ours[name]}"] = torch.cat(mats)
    return out


def moe_lab_to_hf_keys(
    state: dict[str, Tensor], arch: Architecture, num_experts: int = 0
) -> dict[str, Tensor]:
    """Rename a moe_lab state dict to ``arch``'s (on-disk) names, one tensor per expert."""
    inv_global = {v: k for k, v in _GLOBAL_KEYS.items()}
    inv_layer = {v: k for k, v in arch.layer_keys.items()}
    theirs = dict(zip(_OUR_EXPERT_NAMES, arch.expert_names, strict=True))
    out = {}
    for key, value in state.items():
        m = _OUR_EXPERTS.fullmatch(key)
        if m:
            for e, mat in enumerate(value.chunk(num_experts)):  # [F, D] per expert
                mat = mat.t() if m.group(2) == "w2" else mat
                name = f"model.layers.{m.group(1)}.{arch.experts}.{e}.{theirs[m.group(2)]}"
                out[f"{name}.weight"] = mat.contiguous()
        elif not key.endswith("router.expert_bias"):  # transformers has no selection bias
            out[_rename(key, inv_global, inv_layer, _OUR_LAYER)] = value
    return out


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("moe_lab.interop.hf needs transformers: pip install 'moe-lab[hf]'") from e
    return transformers


def to_hf(model: Transformer, architecture: str | None = None):
    """A transformers model holding copies of ``model``'s weights, on its dtype and device.

    Args:
        model: a moe_lab model.
        architecture: the transformers class to build, one of :data:`SUPPORTED_ARCHITECTURES`.
            Default: the one ``model`` was imported from (``model.cfg.hf_architecture``), else
            ``LlamaForCausalLM`` for a dense model and ``MixtralForCausalLM`` for an MoE.

    Raises:
        ValueError: settings the architecture cannot express (each one named).
    """
    transformers = _import_transformers()
    param = next(model.parameters())
    arch = target_architecture(model.cfg, architecture)
    hf_cfg = config_to_hf(model.cfg, arch.name)
    model_class = getattr(transformers, arch.name)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.cfg.moe is None:
        with torch.device(param.device):
            hf_model = model_class(hf_cfg).to(param.dtype)
        state = moe_lab_to_hf_keys(state, arch)
        if model.cfg.tie_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        load_weights(hf_model, state, source="moe_lab model")
        hf_model.tie_weights()
        return hf_model.eval()
    if any(v.any() for k, v in state.items() if k.endswith("router.expert_bias")):
        raise ValueError(
            f"this model cannot be expressed as {arch.name}: its routers carry a selection bias"
        )
    # transformers v5 fuses experts in memory but loads (and saves) one tensor per expert: the
    # stable layout, so MoE models go through a directory (see the module docstring)
    state = moe_lab_to_hf_keys(state, arch, model.cfg.moe.num_experts)
    with tempfile.TemporaryDirectory() as tmp:
        hf_cfg.save_pretrained(tmp)
        save_file(
            {k: v.cpu() for k, v in state.items()},
            f"{tmp}/model.safetensors",
            metadata={"format": "pt"},
        )
        hf_model, info = model_class.from_pretrained(tmp, output_loading_info=True)
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
    """A moe_lab model from a transformers model or a directory written by ``save_pretrained``
    (one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``).

    Raises:
        ValueError: the architecture or one of its options is not supported (the supported
            architectures are listed), or the weights do not fit the configuration.
    """
    if isinstance(source, (str, Path)):
        hf_cfg, state = _read_dir(Path(source))
    elif type(source).__name__ not in ARCHITECTURES:
        architecture_of({"architectures": [type(source).__name__]})  # raises, naming it
    elif ARCHITECTURES[type(source).__name__].experts:
        with tempfile.TemporaryDirectory() as tmp:  # the stable on-disk layout, see to_hf
            source.save_pretrained(tmp)
            hf_cfg, state = _read_dir(Path(tmp))
    else:
        hf_cfg = source.config.to_dict() | {"architectures": [type(source).__name__]}
        state = dict(source.state_dict())
    cfg = config_from_hf(hf_cfg)
    arch = ARCHITECTURES[cfg.hf_architecture]
    state = hf_to_moe_lab_keys(state, arch)
    if cfg.tie_embeddings:  # tied heads are saved once (as the embedding) or aliased in memory
        state.pop("output.weight", None)
    state = {k: v.detach().clone() for k, v in state.items()}
    model = build_model(cfg, device="meta")
    for name, buffer in model.state_dict().items():
        if name.endswith("router.expert_bias"):  # transformers has none: selection is unbiased
            state.setdefault(name, torch.zeros(buffer.shape))
    load_weights(model, state, source=f"{arch.name} weights")
    return model.eval()
