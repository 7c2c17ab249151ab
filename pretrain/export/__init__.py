"""State-dict adapters between our model and Hugging Face formats (both directions)."""

from pretrain.export import hf_albert, hf_bert, hf_llama
from pretrain.export.common import ConversionError

__all__ = ["ConversionError", "hf_albert", "hf_bert", "hf_llama"]
