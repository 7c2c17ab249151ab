"""Import of Hugging Face BERT as an unshared albert-family model with E = H.

BERT is ALBERT without factorization or sharing: post-LN blocks with biases, learned
positions and token types, an MLM head with a dense H -> H transform, and a pooler with a
2-way next-sentence classifier, which takes the place of the SOP head. BERT's GELU is the
exact one (model.hidden_act=gelu).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pretrain.config import ModelConfig, SharingConfig
from pretrain.export.common import ConversionError, State, layers_from_hf, rename
from pretrain.export.hf_albert import albert_family_fields
from pretrain.sharing import SharingPlan

LAYER_MAP = {
    "attention.self.query": ("attention", "fn.q"),
    "attention.self.key": ("attention", "fn.k"),
    "attention.self.value": ("attention", "fn.v"),
    "attention.output.dense": ("attention", "fn.o"),
    "attention.output.LayerNorm": ("attention", "norm"),
    "intermediate.dense": ("ffn", "fn.up"),
    "output.dense": ("ffn", "fn.down"),
    "output.LayerNorm": ("ffn", "norm"),
}
TOP_MAP = {
    "bert.embeddings.word_embeddings": "embeddings.tokens",
    "bert.embeddings.position_embeddings": "embeddings.positions",
    "bert.embeddings.token_type_embeddings": "embeddings.token_types",
    "bert.embeddings.LayerNorm": "embeddings.norm",
    "cls.predictions.transform.dense": "head.dense",
    "cls.predictions.transform.LayerNorm": "head.norm",
    "bert.pooler.dense": "sop_head.pooler",
    "cls.seq_relationship": "sop_head.classifier",
}


def config_from_hf(hf: Mapping[str, Any], sop_head: bool = False) -> ModelConfig:
    """Our ModelConfig for an HF `BertConfig.to_dict()`."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError("only BERT with absolute position embeddings can be imported")
    if hf.get("hidden_act", "gelu") not in ("gelu", "gelu_new"):
        raise ConversionError(f"BERT hidden_act={hf['hidden_act']!r} is not supported")
    return ModelConfig(
        **albert_family_fields(hf),
        embedding_size=hf["hidden_size"],  # no factorization: E = H
        sop_head=sop_head,
        hidden_act=hf.get("hidden_act", "gelu"),
        sharing=SharingConfig(strategy="none"),
    )


def from_hf(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> State:
    """HF `BertForMaskedLM` / `BertForPreTraining` state dict -> ours for `cfg`."""
    state = rename(hf_state, TOP_MAP)
    state["head.bias"] = hf_state["cls.predictions.bias"]
    plan = SharingPlan.from_config(cfg)
    state.update(layers_from_hf(hf_state, plan, lambda i: f"bert.encoder.layer.{i}.", LAYER_MAP))
    if not cfg.sop_head:
        state = {k: v for k, v in state.items() if not k.startswith("sop_head.")}
    return state
