"""Typed run configuration: the schema (`schema`) and how files and overrides become one
(`loading`). A run is described by one `Config`."""

from pretrain.config.loading import from_dict, load_config, load_yaml, parse_overrides
from pretrain.config.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    EngineConfig,
    LoggingConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    SharingConfig,
    TrainConfig,
    UniversalConfig,
    to_dict,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "EngineConfig",
    "LoggingConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "SharingConfig",
    "TrainConfig",
    "UniversalConfig",
    "from_dict",
    "load_config",
    "load_yaml",
    "parse_overrides",
    "to_dict",
]
