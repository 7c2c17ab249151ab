"""State-dict adapter between the albert family and Hugging Face ALBERT.

ALBERT's `num_hidden_groups` G maps layer i to group int(i / (L / G)) with one layer per
group (`inner_group_num` 1): that is our `sequence` plan (`none` is G = L, `all` G = 1),
so those plans export with their sharing intact. Any other plan is unrolled into L groups.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pretrain.config import ModelConfig, SharingConfig
from pretrain.export.common import (
    ConversionError,
    State,
    check_identity_projection,
    identity_projection,
    layers_from_hf,
    layers_to_hf,
    rename,
)
from pretrain.model.reshare import fold_relaxed
from pretrain.sharing import SharingPlan

LAYER_MAP = {
    "attention.query": ("attention", "fn.q"),
    "attention.key": ("attention", "fn.k"),
    "attention.value": ("attention", "fn.v"),
    "attention.dense": ("attention", "fn.o"),
    "attention.LayerNorm": ("attention", "norm"),
    "ffn": ("ffn", "fn.up"),
    "ffn_output": ("ffn", "fn.down"),
    "full_layer_layer_norm": ("ffn", "norm"),
}
TOP_MAP = {
    "albert.embeddings.word_embeddings": "embeddings.tokens",
    "albert.embeddings.position_embeddings": "embeddings.positions",
    "albert.embeddings.token_type_embeddings": "embeddings.token_types",
    "albert.embeddings.LayerNorm": "embeddings.norm",
    "albert.encoder.embedding_hidden_mapping_in": "embeddings.project",
    "predictions.dense": "head.dense",
    "predictions.LayerNorm": "head.norm",
    "albert.pooler": "sop_head.pooler",
    "sop_classifier.classifier": "sop_head.classifier",
}
PROJECTION = "albert.encoder.embedding_hidden_mapping_in"


def set_uses(hf: Mapping[str, Any], index: int) -> tuple[int, ...]:
    """The layer applications an HF ALBERT config's layer group `index` runs."""
    L, G = hf["num_hidden_layers"], hf.get("num_hidden_groups", 1)
    return tuple(i for i in range(L) if hf_group(i, L, G) == index)


def _group_prefix(group: int) -> str:
    return f"albert.encoder.albert_layer_groups.{group}.albert_layers.0."


def hf_group(layer: int, num_layers: int, num_groups: int) -> int:
    return int(layer / (num_layers / num_groups))  # HF's own formula


def config_from_hf(hf: Mapping[str, Any], sop_head: bool = False) -> ModelConfig:
    """Our ModelConfig for an HF `AlbertConfig.to_dict()`."""
    if hf.get("inner_group_num", 1) != 1:
        raise ConversionError(
            f"ALBERT inner_group_num={hf['inner_group_num']} is not supported; only 1 layer per"
            " group maps onto a sharing plan"
        )
    if hf.get("hidden_act", "gelu_new") not in ("gelu_new", "gelu"):
        raise ConversionError(
            f"ALBERT hidden_act={hf['hidden_act']!r}: the albert family has gelu_new or gelu"
        )
    L, G = hf["num_hidden_layers"], hf.get("num_hidden_groups", 1)
    if G == 1:
        sharing = SharingConfig(strategy="all")
    elif G == L:
        sharing = SharingConfig(strategy="none")
    elif L % G == 0:
        sharing = SharingConfig(strategy="sequence", num_sets=G)
    else:
        raise ConversionError(f"ALBERT with {L} layers in {G} groups: L must divide into G")
    return ModelConfig(
        **albert_family_fields(hf),
        embedding_size=hf["embedding_size"],
        sop_head=sop_head,
        hidden_act=hf.get("hidden_act", "gelu_new"),
        sharing=sharing,
    )


def albert_family_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields that ALBERT and BERT configs spell the same way."""
    return {
        "family": "albert",
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": hf["num_attention_heads"],
        "intermediate_size": hf["intermediate_size"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "type_vocab_size": hf["type_vocab_size"],
        "norm_eps": hf["layer_norm_eps"],
        "dropout": hf.get("hidden_dropout_prob", 0.0),
        "attention_dropout": hf.get("attention_probs_dropout_prob", 0.0),
        "initializer_range": hf.get("initializer_range", 0.02),
        "pad_token_id": hf.get("pad_token_id") or 0,
    }


def _groups(cfg: ModelConfig) -> int:
    """ALBERT groups an export of `cfg` has: the plan's own when it is ALBERT's grouping
    (and not relaxed by per-layer deltas), else one per layer."""
    return SharingPlan.from_config(cfg).group_count() or cfg.num_layers


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of an HF `AlbertConfig` for `cfg` (groups as `to_hf` writes them)."""
    return {
        "model_type": "albert",
        "vocab_size": cfg.vocab_size,
        "embedding_size": cfg.embedding_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_hidden_groups": _groups(cfg),
        "inner_group_num": 1,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": max(cfg.type_vocab_size, 1),
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.norm_eps,
        "pad_token_id": cfg.pad_token_id,
    }


def export_notes(cfg: ModelConfig) -> list[str]:
    """What the export changes about the model's layout, said to the user."""
    plan = SharingPlan.from_config(cfg)
    groups = plan.group_count()
    if groups is None:
        return [
            f"ALBERT cannot express this sharing plan ({plan.description}): unrolled into"
            f" {cfg.num_layers} groups"
        ]
    return [f"ALBERT num_hidden_groups={groups}: shared parameters stay shared"]


def from_hf(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> State:
    """HF `AlbertForMaskedLM` / `AlbertForPreTraining` state dict -> ours for `cfg`."""
    plan = SharingPlan.from_config(cfg)
    groups = {int(k.split(".")[3]) for k in hf_state if k.startswith("albert.encoder.albert_layer")}
    G, L = len(groups), cfg.num_layers
    state = rename(hf_state, TOP_MAP)
    if cfg.embedding_size == cfg.hidden_size:
        check_identity_projection(
            hf_state.get(f"{PROJECTION}.weight"), hf_state.get(f"{PROJECTION}.bias"), "ALBERT"
        )
        state = {k: v for k, v in state.items() if not k.startswith("embeddings.project.")}
    state["head.bias"] = hf_state["predictions.bias"]
    state.update(
        layers_from_hf(hf_state, plan, lambda i: _group_prefix(hf_group(i, L, G)), LAYER_MAP)
    )
    if plan.share_qk:
        raise ConversionError("HF ALBERT has separate query and key weights; use share_qk=false")
    if not cfg.sop_head:
        state = {k: v for k, v in state.items() if not k.startswith("sop_head.")}
    return state


def to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> State:
    """Our albert-family state dict -> HF ALBERT (`AlbertForPreTraining` with an SOP head,
    else `AlbertForMaskedLM`) for the groups of `config_to_hf(cfg)`."""
    G = _groups(cfg)
    state, cfg = fold_relaxed(state, cfg)
    plan, L = SharingPlan.from_config(cfg), cfg.num_layers
    # Group g is written from the first logical layer that uses it.
    first_layers = [min(i for i in range(L) if hf_group(i, L, G) == g) for g in range(G)]
    hf = rename(state, {ours: theirs for theirs, ours in TOP_MAP.items()})
    if "embeddings.project.weight" not in state:
        for suffix, tensor in identity_projection(
            cfg.hidden_size, state["embeddings.tokens.weight"].dtype, bias=True
        ).items():
            hf[f"{PROJECTION}.{suffix}"] = tensor
    if "embeddings.token_types.weight" not in state:  # HF always adds a token-type row
        hf["albert.embeddings.token_type_embeddings.weight"] = torch.zeros(
            1, cfg.embedding_size, dtype=state["embeddings.tokens.weight"].dtype
        )
    hf["predictions.bias"] = state["head.bias"]
    hf["predictions.decoder.weight"] = state["embeddings.tokens.weight"]  # tied
    hf["predictions.decoder.bias"] = state["head.bias"]
    layer_map = dict(LAYER_MAP)
    if plan.share_qk:  # HF has a key projection: write the query's into it
        layer_map["attention.key"] = ("attention", "fn.q")
    hf.update(layers_to_hf(state, plan, first_layers, _group_prefix, layer_map))
    return hf
