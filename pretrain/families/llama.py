"""The llama family: pre-RMSNorm, SwiGLU, RoPE, no biases, grouped-query attention, causal LM."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.families import FamilySpec

if TYPE_CHECKING:
    from pretrain.config import ModelConfig


def problems(cfg: ModelConfig) -> list[str]:
    out = []
    if cfg.hidden_act != "gelu_new":
        out.append("model.hidden_act applies to the albert family; llama uses SwiGLU")
    if cfg.type_vocab_size != 0:
        out.append(
            f"model.type_vocab_size ({cfg.type_vocab_size}) must be 0 for the llama family,"
            " which has no token types"
        )
    if cfg.head_dim % 2:
        out.append(
            f"model.hidden_size / model.num_heads ({cfg.head_dim})"
            " must be even for rotary position embeddings"
        )
    return out


SPEC = FamilySpec(
    name="llama",
    display_name="Llama",
    architecture="pre-RMSNorm, SwiGLU, RoPE",
    causal=True,
    defaults={"norm_eps": 1e-6, "type_vocab_size": 0},
    problems=problems,
    blocks="pretrain.model.blocks:LLAMA_BLOCKS",
    token_head="pretrain.model.heads:CausalLMHead",
    sop_head=False,
    hf_model_type="llama",
    pipeline_tag="text-generation",
)
