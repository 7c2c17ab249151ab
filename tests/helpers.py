"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from pretrain.config import ModelConfig, SharingConfig, UniversalConfig
from pretrain.model import SharedTransformer


def tiny_config(
    family: str = "albert", sharing: dict | None = None, universal: dict | None = None, **overrides
) -> ModelConfig:
    base = dict(
        family=family,
        vocab_size=97,
        embedding_size=16,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    base.update(overrides)
    return ModelConfig(
        **base,
        sharing=SharingConfig(**(sharing or {})),
        universal=UniversalConfig(**(universal or {})),
    )


def tiny_model(family: str = "albert", seed: int = 0, **overrides) -> SharedTransformer:
    torch.manual_seed(seed)
    return SharedTransformer(tiny_config(family, **overrides)).eval()


def random_ids(vocab: int = 97, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)
