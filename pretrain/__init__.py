"""Pretraining stack for shared-layer Transformers (ALBERT, Universal Transformer)."""

from pretrain.config import Config, ConfigError, ModelConfig, load_config

__all__ = ["Config", "ConfigError", "ModelConfig", "load_config"]
__version__ = "0.1.0"
