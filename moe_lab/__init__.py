"""moe_lab: dense Llama vs token-routed MoE vs branch-train-merge ensembles, at matched compute."""

from moe_lab.config import Config, ConfigError, ModelConfig, load_config
from moe_lab.nn.model import ModelOutput, Transformer, build_model

__all__ = [
    "Config",
    "ConfigError",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
    "build_model",
    "load_config",
]
__version__ = "0.1.0"
