"""The layer stack: L logical layers run through the sharing plan, or a Universal
Transformer loop with Adaptive Computation Time."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.config import ModelConfig
from pretrain.model.blocks import BlockFamily, LayerContext
from pretrain.model.relaxed import build_deltas
from pretrain.sharing import SharingPlan


def timestep_signal(num_steps: int, dim: int) -> torch.Tensor:
    """Sinusoidal signal (steps, dim) telling the shared block which step it is on."""
    half = dim // 2
    inv = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
    angles = torch.arange(num_steps, dtype=torch.float32)[:, None] * inv[None, :]
    signal = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return nn.functional.pad(signal, (0, dim - 2 * half))


class SharedEncoder(nn.Module):
    """One module per parameter set, each registered once; layer i runs
    `attention[plan.attention[i]]` then `ffn[plan.ffn[i]]`."""

    def __init__(self, cfg: ModelConfig, family: BlockFamily) -> None:
        super().__init__()
        self.plan = SharingPlan.from_config(cfg)
        self.attention = nn.ModuleList(
            family.attention_sublayer(cfg, self.plan.share_qk)
            for _ in range(self.plan.num_attention_sets)
        )
        self.ffn = nn.ModuleList(family.ffn_sublayer(cfg) for _ in range(self.plan.num_ffn_sets))
        self.deltas = build_deltas(self.plan, {"attention": self.attention, "ffn": self.ffn})
        self.act = AdaptiveComputationTime(cfg) if cfg.universal.enabled else None
        # Set by the engine: recompute each layer in backward (non-reentrant, which is safe
        # with shared weights under ZeRO-2/3, where reentrant checkpointing breaks gradient
        # reduction).
        self.checkpoint_layers = False

    def compile_blocks(self) -> None:
        """Compile each parameter set's sublayers in place, once: the layers that share a
        set call the same compiled module. Parameter names do not change."""
        for block in (*self.attention, *self.ffn):
            block.compile()

    def layer(self, i: int, h_BTH: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        if str(i) in self.deltas:
            ctx = dataclasses.replace(ctx, deltas=self.deltas[str(i)])
        h_BTH = self.attention[self.plan.attention[i]](h_BTH, ctx)
        return self.ffn[self.plan.ffn[i]](h_BTH, ctx)

    def _run(self, i: int, h_BTH: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        if self.checkpoint_layers and self.training:
            return checkpoint(self.layer, i, h_BTH, ctx, use_reentrant=False)
        return self.layer(i, h_BTH, ctx)

    def tie_penalty(self) -> torch.Tensor | None:
        """Sum of ||delta||_F^2 over every layer's deltas (None under pure sharing)."""
        penalties = [d.penalty() for layer in self.deltas.values() for d in layer.values()]
        return torch.stack(penalties).sum() if penalties else None

    def forward(
        self, h_BTH: torch.Tensor, ctx: LayerContext, keep_layers: bool = False
    ) -> tuple[
        torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, ...] | None
    ]:
        """Returns the final hidden states, the ponder cost (None without ACT), the tie
        penalty (None under pure sharing) and, with `keep_layers`, each layer application's
        output (not under ACT, whose positions halt at different steps).

        The penalty is taken here, inside the forward: an engine that partitions parameters
        (ZeRO-3) holds the deltas whole only while the module that owns them runs."""
        if self.act is not None:
            h_BTH, ponder_cost = self.act(h_BTH, ctx, self._run, self.plan.num_layers)
            return h_BTH, ponder_cost, self.tie_penalty(), None
        layers = []
        for i in range(self.plan.num_layers):
            h_BTH = self._run(i, h_BTH, ctx)
            layers.append(h_BTH)
        return h_BTH, None, self.tie_penalty(), tuple(layers) if keep_layers else None


class AdaptiveComputationTime(nn.Module):
    """ACT over the steps of one shared block (Graves 2016; Universal Transformer).

    Each position accumulates halting probabilities p = sigmoid(W h + b); it halts once the
    sum would pass the threshold, spending the remainder R on its last step. The state is
    updated as w * f(s) + (1 - w) * s with w the step's halting weight, and the ponder cost
    is mean(N + R), N being the number of steps a position took.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.threshold = cfg.universal.halting_threshold
        self.halt = nn.Linear(cfg.hidden_size, 1)
        self.bias_init = cfg.universal.halting_bias_init
        # The signal enters at the scale the weights are initialised at. At its natural
        # scale (entries up to 1) it drowns the token state it is added to (entries about
        # initializer_range * sqrt(E), far less for llama's linear embedding), every position
        # then looks alike to the shared block, and a copy task does not train at all.
        signal = timestep_signal(cfg.num_layers, cfg.hidden_size) * cfg.initializer_range
        self.register_buffer("signal", signal, persistent=False)

    def forward(
        self,
        state_BTH: torch.Tensor,
        ctx: LayerContext,
        run_layer: Callable[[int, torch.Tensor, LayerContext], torch.Tensor],
        max_steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = state_BTH.shape
        halting_BT = state_BTH.new_zeros(B, T)
        remainder_BT = state_BTH.new_zeros(B, T)
        updates_BT = state_BTH.new_zeros(B, T)
        previous_BTH = state_BTH
        for step in range(max_steps):
            state_BTH = previous_BTH + self.signal[step].to(state_BTH.dtype)
            p_BT = torch.sigmoid(self.halt(state_BTH)).squeeze(-1)
            running_BT = (halting_BT < 1.0).to(p_BT.dtype)
            reaches_BT = (halting_BT + p_BT * running_BT) > self.threshold
            new_halted_BT = reaches_BT.to(p_BT.dtype) * running_BT
            running_BT = (~reaches_BT).to(p_BT.dtype) * running_BT
            halting_BT = halting_BT + p_BT * running_BT
            remainder_BT = remainder_BT + new_halted_BT * (1.0 - halting_BT)
            halting_BT = halting_BT + new_halted_BT * remainder_BT
            updates_BT = updates_BT + running_BT + new_halted_BT
            w_BT1 = (p_BT * running_BT + new_halted_BT * remainder_BT).unsqueeze(-1)
            transformed_BTH = run_layer(0, state_BTH, ctx)
            previous_BTH = w_BT1 * transformed_BTH + (1.0 - w_BT1) * previous_BTH
            if not bool((running_BT > 0).any()):
                break
        ponder_cost = (updates_BT + remainder_BT).mean()
        return previous_BTH, ponder_cost
