"""State-dict adapter between the llama family and Hugging Face Llama (unrolled).

Our llama embedding is a V x E table followed by a bias-free E -> H projection, with no
norm in between, so table @ projection^T is exactly an H-wide table; the head is tied
through the same product, so it exports as `tie_word_embeddings=True`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pretrain.config import ModelConfig, SharingConfig
from pretrain.export.common import (
    ConversionError,
    State,
    layers_from_hf,
    layers_to_hf,
)
from pretrain.model.reshare import fold_relaxed
from pretrain.sharing import SharingPlan

LAYER_MAP = {
    "self_attn.q_proj": ("attention", "fn.q"),
    "self_attn.k_proj": ("attention", "fn.k"),
    "self_attn.v_proj": ("attention", "fn.v"),
    "self_attn.o_proj": ("attention", "fn.o"),
    "input_layernorm": ("attention", "norm"),
    "mlp.gate_proj": ("ffn", "fn.gate"),
    "mlp.up_proj": ("ffn", "fn.up"),
    "mlp.down_proj": ("ffn", "fn.down"),
    "post_attention_layernorm": ("ffn", "norm"),
}


def _layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def _rope_theta(hf: Mapping[str, Any]) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConversionError(f"Llama rope_type={kind!r} is not supported; only plain RoPE is")
    return float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Our ModelConfig (E = H, no sharing) for an HF `LlamaConfig.to_dict()`."""
    H, heads = hf["hidden_size"], hf["num_attention_heads"]
    problems = {
        "attention_bias": hf.get("attention_bias", False) is not False,
        "mlp_bias": hf.get("mlp_bias", False) is not False,
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "head_dim": hf.get("head_dim") not in (None, H // heads),
        "tie_word_embeddings": hf.get("tie_word_embeddings") is False,
    }
    bad = [key for key, wrong in problems.items() if wrong]
    if bad:
        raise ConversionError(
            f"Llama config {', '.join(f'{k}={hf.get(k)!r}' for k in bad)} is not supported by"
            " the llama family (no biases, SiLU, head_dim = hidden/heads, tied embeddings)"
        )
    return ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        embedding_size=H,
        hidden_size=H,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        norm_eps=hf["rms_norm_eps"],
        rope_theta=_rope_theta(hf),
        attention_dropout=hf.get("attention_dropout", 0.0),
        initializer_range=hf.get("initializer_range", 0.02),
        pad_token_id=hf.get("pad_token_id") or 0,
        sharing=SharingConfig(strategy="none"),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of an HF `LlamaConfig` for `cfg`, unrolled to L layers."""
    return {
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.attention_dropout,
        "initializer_range": cfg.initializer_range,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": True,
    }


def export_notes(cfg: ModelConfig) -> list[str]:
    """What the export changes about the model's layout, said to the user."""
    return [f"llama: {cfg.num_layers} layers unrolled, factorized embedding folded to V x H"]


def from_hf(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> State:
    """HF `LlamaForCausalLM` state dict -> ours for `cfg` (E must equal H)."""
    if cfg.embedding_size != cfg.hidden_size:
        raise ConversionError(
            "an HF Llama embedding is H-wide; import it with embedding_size == hidden_size"
        )
    table = hf_state["model.embed_tokens.weight"]
    head = hf_state.get("lm_head.weight")
    if head is not None and not torch.equal(head, table):
        raise ConversionError(
            "this Llama has an untied lm_head; the llama family ties its head to the embedding"
        )
    plan = SharingPlan.from_config(cfg)
    state = {"embeddings.tokens.weight": table, "final_norm.weight": hf_state["model.norm.weight"]}
    state.update(layers_from_hf(hf_state, plan, _layer_prefix, LAYER_MAP))
    if plan.share_qk:
        raise ConversionError("HF Llama has separate query and key weights; use share_qk=false")
    return state


def to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> State:
    """Our llama-family state dict -> HF `LlamaForCausalLM`, the factorized table folded."""
    state, cfg = fold_relaxed(state, cfg)
    table_VE = state["embeddings.tokens.weight"]
    project_HE = state.get("embeddings.project.weight")
    table_VH = table_VE if project_HE is None else table_VE @ project_HE.T
    plan = SharingPlan.from_config(cfg)
    layer_map = dict(LAYER_MAP)
    if plan.share_qk:
        layer_map["self_attn.k_proj"] = ("attention", "fn.q")
    hf = {
        "model.embed_tokens.weight": table_VH,
        "lm_head.weight": table_VH,
        "model.norm.weight": state["final_norm.weight"],
    }
    hf.update(layers_to_hf(state, plan, list(range(cfg.num_layers)), _layer_prefix, layer_map))
    return hf
