"""The shared-layer Transformer: factorized embedding, shared encoder, tied heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.config import ModelConfig, SharingConfig
from pretrain.model.blocks import LayerContext, RowSplit, rope_tables
from pretrain.model.embeddings import FactorizedEmbedding
from pretrain.model.encoder import AdaptiveComputationTime, SharedEncoder
from pretrain.model.heads import SOPHead
from pretrain.model.relaxed import LowRankDelta
from pretrain.model.reshare import ShareReport, reshare
from pretrain.sharing import STRATEGIES


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(B, T, V), or (N, V) for the N positions selected by `predict_mask`."""
    sop_logits: torch.Tensor | None = None
    """(B, 2) sentence-order logits (albert with an SOP head)."""
    ponder_cost: torch.Tensor | None = None
    """Scalar mean(N + R) of ACT (Universal Transformer mode), unweighted."""
    tie_penalty: torch.Tensor | None = None
    """Scalar sum of squared per-layer deltas (relaxed sharing), unweighted."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """(B, T, H) output of each of the L layer applications, with `output_hidden_states`."""


class SharedTransformer(nn.Module):
    """A Transformer whose L logical layers draw their weights from a sharing plan."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.family = family = cfg.spec.block_family()  # resolved once, not per forward
        self.embeddings = FactorizedEmbedding(cfg, family)
        self.encoder = SharedEncoder(cfg, family)
        self.final_norm = family.norm(cfg.hidden_size, cfg.norm_eps) if family.final_norm else None
        self.head = cfg.spec.token_head_class()(cfg)
        self.sop_head = SOPHead(cfg) if cfg.spec.sop_head and cfg.sop_head else None
        self.apply(self._init_weights)

    @property
    def plan(self):
        return self.encoder.plan

    def share_params(
        self,
        start: int,
        end: int | None = None,
        ratio: float = 1.0,
        *,
        num_sets: int = 1,
        strategy: str = "all",
        scope: str = "block",
        tie_penalty: float = 0.0,
    ) -> ShareReport:
        """Convert this model in place to share layers `start`..`end` (inclusive; None: the
        last layer) in `num_sets` sets by `strategy`, for `scope` (block, attention or ffn).

        Each set starts as the mean of the layers it serves. With `ratio` < 1 every layer of
        the range keeps a low-rank delta of each shared linear, initialised from the
        truncated SVD of its own weight minus the shared one, at the largest rank that
        keeps the shared sets a fraction `ratio` of the range; `tie_penalty` weights the L2
        penalty on those deltas in training. A model that already shares is converted from
        its unrolled weights (each layer's set plus its delta); shared Q/K is kept as it
        is. Works on a trained, imported or fresh model, on its device and dtype; build the
        optimizer afterwards, since the encoder's parameters are new tensors.

        Returns the report: unique parameters before and after, the delta ranks, and each
        layer's relative weight error. A plan the model cannot take raises ConfigError and
        leaves the model as it was.
        """
        fixed = strategy in STRATEGIES and not STRATEGIES[strategy].takes_sets
        sharing = SharingConfig(
            strategy=strategy,
            num_sets=None if fixed and num_sets == 1 else num_sets,
            scope=scope,
            start=start,
            end=end,
            share_qk=self.cfg.sharing.share_qk,
            ratio=ratio,
            tie_penalty=tie_penalty,
        )
        state, cfg, report = reshare(self.state_dict(), self.cfg, sharing)
        like = next(self.encoder.parameters())
        with torch.device(like.device):
            encoder = SharedEncoder(cfg, cfg.spec.block_family()).to(like.dtype)
        prefix = "encoder."
        encoder.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
        encoder.train(self.encoder.training)
        encoder.checkpoint_layers = self.encoder.checkpoint_layers
        self.encoder, self.cfg = encoder, cfg
        return report

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        # apply() is post-order: the two below run after their Linear children's init.
        elif isinstance(module, LowRankDelta):
            nn.init.zeros_(module.up.weight)  # start from pure sharing
        elif isinstance(module, AdaptiveComputationTime):
            nn.init.constant_(module.halt.bias, module.bias_init)

    def attention_context(
        self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None, dtype
    ) -> LayerContext:
        T, device = input_ids_BT.shape[1], input_ids_BT.device
        rope = None
        if not self.family.learned_positions:
            rope = rope_tables(T, self.cfg.head_dim, self.cfg.rope_theta, device, dtype)
        if attention_mask_BT is None:
            return LayerContext(mask=None, is_causal=self.cfg.causal, rope=rope)
        keys_BT = attention_mask_BT.bool()
        # On GPUs the rows without padding keep the flash kernel (CPUs lose nothing to masks).
        rows = RowSplit.of(keys_BT) if device.type == "cuda" else None
        keys_B11T = keys_BT[:, None, None, :]
        if not self.cfg.causal:
            return LayerContext(mask=keys_B11T, is_causal=False, rope=rope, rows=rows)
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        # A position may always see itself, so that padded rows stay finite.
        eye_TT = torch.eye(T, dtype=torch.bool, device=device)
        mask_B1TT = (causal_TT & keys_B11T) | eye_TT
        return LayerContext(mask=mask_B1TT, is_causal=True, rope=rope, rows=rows)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        predict_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, T), 1 for real tokens; token_type_ids (B, T);
        predict_mask (B, T) bool: compute token logits only there (masked positions);
        output_hidden_states: also return every layer application's output."""
        h_BTH = self.embeddings(input_ids, token_type_ids)
        ctx = self.attention_context(input_ids, attention_mask, h_BTH.dtype)
        h_BTH, ponder_cost, tie_penalty, layers = self.encoder(h_BTH, ctx, output_hidden_states)
        if self.final_norm is not None:
            h_BTH = self.final_norm(h_BTH)
        sop_logits = self.sop_head(h_BTH) if self.sop_head is not None else None
        h_sel = h_BTH[predict_mask] if predict_mask is not None else h_BTH
        logits = self.head(h_sel, self.embeddings)
        return ModelOutput(
            logits=logits,
            sop_logits=sop_logits,
            ponder_cost=ponder_cost,
            tie_penalty=tie_penalty,
            hidden_states=layers,
        )
