"""Factorized embedding (ALBERT): a V x E token table, then a linear E -> H projection."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.model.blocks import BlockFamily


class FactorizedEmbedding(nn.Module):
    """tokens (V x E) [+ positions + token types, LayerNorm(E)] -> project (E -> H).

    With E == H the projection is dropped, as in Google's ALBERT. The llama family keeps
    only the table and a bias-free projection, so the two fold into one H-wide table.
    """

    def __init__(self, cfg: ModelConfig, family: BlockFamily) -> None:
        super().__init__()
        E, H = cfg.embedding_size, cfg.hidden_size
        self.tokens = nn.Embedding(cfg.vocab_size, E, padding_idx=cfg.pad_token_id)
        self.positions = (
            nn.Embedding(cfg.max_position_embeddings, E) if family.learned_positions else None
        )
        self.token_types = nn.Embedding(cfg.type_vocab_size, E) if cfg.type_vocab_size else None
        self.norm = nn.LayerNorm(E, eps=cfg.norm_eps) if family.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.project = nn.Linear(E, H, bias=family.bias) if E != H else None

    def forward(
        self, input_ids_BT: torch.Tensor, token_type_ids_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        e_BTE = self.tokens(input_ids_BT)
        # Same order of additions as HF ALBERT: tokens + types + positions.
        if self.token_types is not None:
            if token_type_ids_BT is None:
                e_BTE = e_BTE + self.token_types.weight[0]
            else:
                e_BTE = e_BTE + self.token_types(token_type_ids_BT)
        if self.positions is not None:
            e_BTE = e_BTE + self.positions.weight[: input_ids_BT.shape[1]]
        if self.norm is not None:
            e_BTE = self.norm(e_BTE)
        e_BTE = self.dropout(e_BTE)
        return self.project(e_BTE) if self.project is not None else e_BTE  # factorized: E << H

    def unembed(self, h_BTH: torch.Tensor) -> torch.Tensor:
        """H -> E through the transposed projection, the inverse direction of `forward`'s
        tied linear map (llama's head)."""
        return h_BTH @ self.project.weight if self.project is not None else h_BTH
