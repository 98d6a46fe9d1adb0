"""Typed configuration: dataclass schemas, YAML + ``key=value`` loading (OmegaConf), validation.

Modules receive plain dataclasses, never a ``DictConfig``. Every error a user can cause by editing a
YAML file or an override is a :class:`ConfigError` naming the dotted key and the offending value.
"""

from moe_lab.config.base import ConfigError
from moe_lab.config.load import (
    PRESET_DIR,
    Config,
    load_config,
    load_model_preset,
    model_presets,
    save_config,
)
from moe_lab.config.model import (
    LBL_FORMS,
    LBL_GRANULARITIES,
    MOE_BACKENDS,
    ModelConfig,
    MoEConfig,
    RopeScalingConfig,
)
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
    "LBL_FORMS",
    "LBL_GRANULARITIES",
    "MOE_BACKENDS",
    "PRESET_DIR",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EnsembleConfig",
    "IFCConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "RopeScalingConfig",
    "RunConfig",
    "TrainConfig",
    "XELMConfig",
    "load_config",
    "load_model_preset",
    "model_presets",
    "save_config",
]
