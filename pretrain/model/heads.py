"""Output heads. The token decoders are tied to the embedding table: they read
`embeddings.tokens.weight` at call time, so the tie is one Parameter, never a copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig
from pretrain.model.blocks import GELU_APPROXIMATION
from pretrain.model.embeddings import FactorizedEmbedding


class MLMHead(nn.Module):
    """ALBERT's MLM head: dense H -> E, GELU, LayerNorm(E), tied decoder E -> V, bias."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.embedding_size)
        self.norm = nn.LayerNorm(cfg.embedding_size, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.approximate = GELU_APPROXIMATION[cfg.hidden_act]

    def forward(self, h_NH: torch.Tensor, embeddings: FactorizedEmbedding) -> torch.Tensor:
        e_NE = self.norm(F.gelu(self.dense(h_NH), approximate=self.approximate))
        return F.linear(e_NE, embeddings.tokens.weight, self.bias)

    def forward_flops(self, embeddings: FactorizedEmbedding) -> int:
        """Forward FLOPs per predicted token: dense H -> E, then the tied E -> V decoder."""
        return 2 * self.dense.weight.numel() + 2 * embeddings.tokens.weight.numel()


class CausalLMHead(nn.Module):
    """Causal LM head tied through the factorized projection: H -> E by the transposed
    projection, then E -> V by the transposed token table. No parameters of its own."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()

    def forward(self, h_NH: torch.Tensor, embeddings: FactorizedEmbedding) -> torch.Tensor:
        return F.linear(embeddings.unembed(h_NH), embeddings.tokens.weight)

    def forward_flops(self, embeddings: FactorizedEmbedding) -> int:
        """Forward FLOPs per token: the transposed projection, then the tied decoder."""
        project = 0 if embeddings.project is None else embeddings.project.weight.numel()
        return 2 * project + 2 * embeddings.tokens.weight.numel()


class SOPHead(nn.Module):
    """Sentence-order prediction on the first token: pooler (dense + tanh), classifier."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_size, 2)

    def forward(self, h_BTH: torch.Tensor) -> torch.Tensor:
        pooled_BH = torch.tanh(self.pooler(h_BTH[:, 0]))
        return self.classifier(self.dropout(pooled_BH))
