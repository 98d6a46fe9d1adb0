"""Typed configuration: dataclass schemas, YAML + ``key=value`` loading (OmegaConf), validation.

Modules receive plain dataclasses, never a ``DictConfig``. Every error a user can cause by editing a
YAML file or an override is a :class:`ConfigError` naming the dotted key and the offending value.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TypeVar, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from moe_lab.config.base import ConfigError, require
from moe_lab.config.model import ModelConfig
from moe_lab.config.sections import (
    ClusterConfig,
    DataConfig,
    EnsembleConfig,
    IFCConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    XELMConfig,
)

__all__ = [
    "PRESET_DIR",
    "Config",
    "load_config",
    "load_model_preset",
    "model_presets",
    "read_yaml_mapping",
    "save_config",
    "suggest_key",
    "yaml_error",
]

PRESET_DIR = Path(__file__).parent.parent / "configs" / "model"

C = TypeVar("C")


@dataclass
class Config:
    """Top-level configuration of a run; each subsystem reads its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    ifc: IFCConfig = field(default_factory=IFCConfig)
    xelm: XELMConfig = field(default_factory=XELMConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.cluster.validate("cluster")
        self.ensemble.validate("ensemble")
        self.ifc.validate("ifc")
        self.xelm.validate("xelm")
        self.parallel.validate("parallel")
        self.run.validate("run")
        require(
            not self.parallel.ep or self.model.moe is not None,
            "parallel.ep=true needs an MoE model (model.moe)",
        )
        require(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
            f"({self.model.max_seq_len})",
        )


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


def suggest_key(schema: type, dotted: str) -> str:
    """' Did you mean ...?' for an unknown dotted key, from the schema's field names."""
    cls: type | None = schema
    *parents, leaf = dotted.split(".")
    for part in parents:
        cls = _dataclass_of(get_type_hints(cls).get(part))
        if cls is None:
            return ""
    close = difflib.get_close_matches(leaf, [f.name for f in fields(cls)], n=1)
    return f" Did you mean {'.'.join([*parents, close[0]])!r}?" if close else ""


def _parse_dotlist(dotlist: list[str]):
    for item in dotlist:  # one at a time, so a malformed value is reported with its override
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as e:
            reason = str(getattr(e, "problem", None) or e).splitlines()[0]
            raise ConfigError(f"override {item!r} has an invalid value ({reason})") from None
    return OmegaConf.from_dotlist(dotlist)


def _lists_from_strings(schema: type, node) -> None:
    """A single string where the schema has a list (``data.train_files=a.jsonl``) becomes a
    one-element list, in place, at any depth of ``node`` (a DictConfig)."""
    if not is_dataclass(schema) or not OmegaConf.is_dict(node):
        return
    hints = get_type_hints(schema)
    for key in list(node.keys()):
        annotation = hints.get(key)
        if annotation is None:
            continue
        value = node[key]
        is_list = any(get_origin(t) is list for t in (annotation, *get_args(annotation)))
        if is_list and isinstance(value, str):
            node[key] = [value]
        elif OmegaConf.is_dict(value):
            _lists_from_strings(_dataclass_of(annotation), value)


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
        raw = read_yaml_mapping(path) if path is not None else OmegaConf.create()
        if isinstance(raw.get("model"), str):
            preset_in_file = raw.pop("model")
            layers.append(OmegaConf.create({"model": OmegaConf.load(_preset_path(preset_in_file))}))
        if preset is not None:
            layers.append(OmegaConf.create({"model": OmegaConf.load(_preset_path(preset))}))
        overrides_node = _parse_dotlist(dotlist)
        for node in (raw, overrides_node):
            _lists_from_strings(schema, node)
        layers += [raw, overrides_node]
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(f"unknown config key {key!r}.{suggest_key(schema, key)}") from None
    except OmegaConfBaseException as e:
        key = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise ConfigError(f"{key}{str(e.msg).splitlines()[0]}") from None
    cfg.validate()
    return cfg


def yaml_error(path: str | Path, e: yaml.YAMLError) -> str:
    """``FILE, line N: not valid YAML (what the parser found)``."""
    mark = getattr(e, "problem_mark", None)
    where = f", line {mark.line + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{path}{where}: not valid YAML ({problem})"


def read_yaml_mapping(path: str | Path) -> DictConfig:
    """A YAML file of ``key: value`` sections, with a one-line error naming the file (and the
    line) when it is malformed or holds something else, such as a list."""
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error(path, e)) from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of config sections, not a list")
    return node


def save_config(cfg: object, path: str | Path) -> None:
    """Write a config dataclass as YAML; :func:`load_config` reads it back to an equal object."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), path)
