"""Our models out of training and across formats: the checkpoint reader (checkpoint), the
native folder (native), and Hugging Face folders (hf: one table of formats, FORMATS, whose
rows name the state-dict adapters hf_albert, hf_bert and hf_llama)."""

from pretrain.export import hf_albert, hf_bert, hf_llama
from pretrain.export.common import ConversionError

__all__ = ["ConversionError", "hf_albert", "hf_bert", "hf_llama"]
