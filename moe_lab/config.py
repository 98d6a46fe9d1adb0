"""Typed configuration: dataclass schemas, YAML + ``key=value`` loading (OmegaConf), validation.

Modules receive plain dataclasses, never a ``DictConfig``. Every error a user can cause by editing a
YAML file or an override is a :class:`ConfigError` naming the dotted key and the offending value.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TypeVar, get_args, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

__all__ = [
    "Config",
    "ConfigError",
    "ModelConfig",
    "RopeScalingConfig",
    "load_config",
    "load_model_preset",
    "model_presets",
    "save_config",
]

PRESET_DIR = Path(__file__).parent / "configs" / "model"

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, out of range or inconsistent."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(value: object, key: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    _require(ok, f"{key} must be a positive integer, got {value!r}")


def _positive_float(value: object, key: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    _require(ok, f"{key} must be a positive number, got {value!r}")


@dataclass
class RopeScalingConfig:
    """Llama 3.1 RoPE frequency scaling (``rope_type: llama3`` in transformers).

    Wavelengths longer than ``original_max_seq_len / low_freq_factor`` are stretched by ``factor``,
    those shorter than ``original_max_seq_len / high_freq_factor`` are kept, and the band in between
    is interpolated smoothly (Llama 3 herd paper, 2024; meta-llama/llama-models ``apply_scaling``).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def validate(self, prefix: str) -> None:
        _positive_float(self.factor, f"{prefix}.factor")
        _positive_float(self.low_freq_factor, f"{prefix}.low_freq_factor")
        _positive_float(self.high_freq_factor, f"{prefix}.high_freq_factor")
        _positive_int(self.original_max_seq_len, f"{prefix}.original_max_seq_len")
        _require(
            self.high_freq_factor > self.low_freq_factor,
            f"{prefix}.high_freq_factor ({self.high_freq_factor}) must exceed "
            f"{prefix}.low_freq_factor ({self.low_freq_factor})",
        )


@dataclass
class ModelConfig:
    """Shape of the Llama backbone. Every width is explicit: no module re-derives its own size.

    The defaults are the ``cpu-tiny`` preset; the real Llama shapes live in ``configs/model/``.
    """

    dim: int = 64  # residual stream width
    n_layers: int = 2
    n_heads: int = 4  # query heads; head_dim = dim // n_heads
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; None = n_heads
    vocab_size: int = 512
    ffn_hidden: int = 176  # SwiGLU hidden width (Llama: ~8/3 * dim rounded to a multiple)
    max_seq_len: int = 256
    rope_theta: float = (
        10000.0  # RoPE base; Llama 3 uses 500000, Llama 2 Long raises it for long context
    )
    rope_scaling: RopeScalingConfig | None = None  # Llama 3.1 frequency scaling
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share the input embedding with the output head
    init_std: float = 0.02  # residual projections use init_std / sqrt(2 * n_layers) (GPT-2)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def validate(self, prefix: str = "model") -> None:
        """Raise :class:`ConfigError` naming ``prefix.<field>`` for the first invalid value."""
        p = prefix
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "ffn_hidden", "max_seq_len"):
            _positive_int(getattr(self, name), f"{p}.{name}")
        if self.n_kv_heads is not None:
            _positive_int(self.n_kv_heads, f"{p}.n_kv_heads")
            _require(
                self.n_heads % self.n_kv_heads == 0,
                f"{p}.n_heads ({self.n_heads}) must be divisible by "
                f"{p}.n_kv_heads ({self.n_kv_heads})",
            )
        _require(
            self.dim % self.n_heads == 0,
            f"{p}.dim ({self.dim}) must be divisible by {p}.n_heads ({self.n_heads})",
        )
        _require(
            self.head_dim % 2 == 0,
            f"{p}.dim / {p}.n_heads must be even for RoPE, got head_dim {self.head_dim}",
        )
        _positive_float(self.rope_theta, f"{p}.rope_theta")
        _positive_float(self.norm_eps, f"{p}.norm_eps")
        _positive_float(self.init_std, f"{p}.init_std")
        _require(
            isinstance(self.tie_embeddings, bool),
            f"{p}.tie_embeddings must be true or false, got {self.tie_embeddings!r}",
        )
        if self.rope_scaling is not None:
            self.rope_scaling.validate(f"{p}.rope_scaling")


@dataclass
class Config:
    """Top-level configuration of a run; each subsystem adds the section it reads."""

    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        self.model.validate("model")


def model_presets() -> list[str]:
    """Names of the model presets shipped in ``configs/model/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"model preset file {name_or_path!r} does not exist")
        return path
    path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name_or_path, model_presets(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"model: unknown preset {name_or_path!r}.{hint} Available: {', '.join(model_presets())}"
        )
    return path


def load_model_preset(
    name_or_path: str, overrides: tuple[str, ...] | list[str] = ()
) -> ModelConfig:
    """A :class:`ModelConfig` from a preset name (``llama3-8b``) or a YAML file of model fields."""
    overrides = [f"model.{o}" for o in overrides]
    return load_config(overrides=[f"model={name_or_path}", *overrides]).model


def _split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[str | None, list[str]]:
    """Separate a ``model=<preset>`` override from the ``key=value`` dotlist."""
    preset, rest = None, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key.strip() == "model":
            preset = value.strip()
        else:
            rest.append(item)
    return preset, rest


def _dataclass_of(annotation: object) -> type | None:
    """The dataclass in a field annotation such as ``RopeScalingConfig`` or ``Optional[...]``."""
    for candidate in (annotation, *get_args(annotation)):
        if is_dataclass(candidate):
            return candidate
    return None


def _suggest(schema: type, dotted: str) -> str:
    """' Did you mean ...?' for an unknown dotted key, from the schema's field names."""
    cls: type | None = schema
    *parents, leaf = dotted.split(".")
    for part in parents:
        cls = _dataclass_of(get_type_hints(cls).get(part))
        if cls is None:
            return ""
    close = difflib.get_close_matches(leaf, [f.name for f in fields(cls)], n=1)
    return f" Did you mean {'.'.join([*parents, close[0]])!r}?" if close else ""


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    schema: type[C] = Config,
) -> C:
    """Load ``schema`` from an optional YAML file plus ``key=value`` overrides, and validate it.

    ``model`` may be a preset name or a path to a YAML file of model fields, either in the file
    (``model: llama3-8b``) or as an override (``model=cpu-tiny``); other ``model.*`` keys refine it.

    Args:
        path: YAML file whose keys mirror ``schema``; None starts from the defaults.
        overrides: dotlist such as ``["model.n_layers=4", "model.rope_theta=5e5"]``; applied last.
        schema: the dataclass to load (default :class:`Config`).

    Returns:
        An instance of ``schema``, validated.

    Raises:
        ConfigError: unknown keys (with a suggestion), wrong types, invalid or inconsistent values.
    """
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    preset, dotlist = _split_overrides(overrides)
    try:
        layers = [OmegaConf.structured(schema)]
        raw = OmegaConf.load(path) if path is not None else OmegaConf.create()
        if isinstance(raw.get("model"), str):
            preset_in_file = raw.pop("model")
            layers.append(OmegaConf.create({"model": OmegaConf.load(_preset_path(preset_in_file))}))
        if preset is not None:
            layers.append(OmegaConf.create({"model": OmegaConf.load(_preset_path(preset))}))
        layers += [raw, OmegaConf.from_dotlist(dotlist)]
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(f"unknown config key {key!r}.{_suggest(schema, key)}") from None
    except OmegaConfBaseException as e:
        key = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise ConfigError(f"{key}{str(e.msg).splitlines()[0]}") from None
    cfg.validate()
    return cfg


def save_config(cfg: object, path: str | Path) -> None:
    """Write a config dataclass as YAML; :func:`load_config` reads it back to an equal object."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), path)
