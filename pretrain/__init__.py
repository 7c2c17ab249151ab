"""Pretraining stack for shared-layer Transformers (ALBERT, Universal Transformer)."""

from pretrain.config import Config, ConfigError, ModelConfig, load_config

__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", "load_model"]


def load_model(directory):
    """A native export (tools/convert_checkpoint.py --format native) as a model in eval
    mode; `model(input_ids, attention_mask=None, token_type_ids=None).logits` is (B, T, V)."""
    from pretrain.export.native import load_model as load

    return load(directory)


__version__ = "0.1.0"
