"""The albert family: post-LN, GELU, biases, learned positions, bidirectional, MLM (+ SOP).

BERT imports land here too (an unshared albert-family model with exact GELU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.families import FamilySpec

if TYPE_CHECKING:
    from pretrain.config import ModelConfig


def problems(cfg: ModelConfig) -> list[str]:
    out = []
    if cfg.num_kv_heads != cfg.num_heads:
        out.append(
            f"model.num_kv_heads ({cfg.num_kv_heads}) must equal model.num_heads"
            f" ({cfg.num_heads}) for the albert family; grouped-query attention is llama's"
        )
    return out


SPEC = FamilySpec(
    name="albert",
    display_name="ALBERT",
    architecture="post-LN, GELU",
    causal=False,
    defaults={"norm_eps": 1e-12, "type_vocab_size": 2},
    problems=problems,
    blocks="pretrain.model.blocks:ALBERT_BLOCKS",
    token_head="pretrain.model.heads:MLMHead",
    sop_head=True,
    hf_model_type="albert",
    pipeline_tag="fill-mask",
)
