"""Attention, feed-forward and norm layers, and the block of each family.

A block is two sublayers, attention then feed-forward, each with its own norm and residual.
Keeping them apart lets the sharing plan share the whole block, only attention, or only the
FFN. The family decides the residual style (albert: post-LN; llama: pre-RMSNorm) and the
layers inside: one `BlockFamily` per family, named by its spec (pretrain/families).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass
class RowSplit:
    """The rows of a batch that mixes full rows (no padding) with padded ones. Full rows
    take the unmasked flash kernel, so a masked kernel runs only on the padded rows (ALBERT
    batches are mostly full rows: their samples fill the sequence but at document ends)."""

    full: torch.Tensor
    """(F,) indices of the rows without padding."""
    padded: torch.Tensor
    """(P,) indices of the other rows."""
    order: torch.Tensor
    """(B,) where each row sits in cat(full, padded): the inverse permutation."""

    @staticmethod
    def of(keys_BT: torch.Tensor) -> RowSplit | None:
        """None unless the batch has both kinds of row (one host sync, per forward pass)."""
        is_full_B = keys_BT.all(dim=1)
        full = is_full_B.nonzero().squeeze(1)
        if len(full) in (0, len(is_full_B)):
            return None
        padded = (~is_full_B).nonzero().squeeze(1)
        return RowSplit(full, padded, torch.cat([full, padded]).argsort())


@dataclass
class LayerContext:
    """What the sublayers of one layer application need: attention inputs computed once
    per forward pass, and the layer's own low-rank deltas under relaxed sharing."""

    mask: torch.Tensor | None
    """Boolean (B, 1, 1|T, T), True where attention is allowed; None for no mask."""
    is_causal: bool
    """The model is causal. `mask` then carries it where there is one; where there is none
    (a batch, or the rows of one, without padding), SDPA applies it inside the kernel."""
    rope: tuple[torch.Tensor, torch.Tensor] | None
    """(cos, sin), each (T, head_dim), for rotary position embeddings."""
    deltas: Mapping[str, nn.Module] | None = None
    """Per-role (q, k, v, o, gate, up, down) low-rank updates of this layer's shared linears."""
    rows: RowSplit | None = None
    """Set on CUDA when `mask` pads only some rows: see `split_rows_attention`."""


def project(linear: nn.Linear, role: str, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """A shared linear plus, under relaxed sharing, this layer's delta for it."""
    y = linear(x)
    if ctx.deltas is not None and role in ctx.deltas:
        y = y + ctx.deltas[role](x)
    return y


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, head_dim) in the half-split layout of HF Llama."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    pos = torch.arange(seq_len, device=device).float()
    freqs_TD = torch.outer(pos, inv_freq)
    emb_TD = torch.cat((freqs_TD, freqs_TD), dim=-1)
    return emb_TD.cos().to(dtype), emb_TD.sin().to(dtype)


@cache
def cpu_bf16_attention_by_matmul() -> bool:
    """True on CPUs without AMX tiles. There PyTorch's CPU flash kernel runs bf16 at a
    third to half of its fp32 speed, while bf16 matmuls use the vector bf16 units. Measured
    forward + backward, 2 threads, (B, heads, T, d) = (16, 3, 64, 64): flash bf16 4.4 ms,
    flash fp32 2.0 ms, matmul attention in bf16 1.3 ms; (8, 12, 128, 64): 22, 14 and 7 ms."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return not (amx is not None and amx())


def matmul_attention(
    q_BnTd: torch.Tensor,
    k_BnTd: torch.Tensor,
    v_BnTd: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two matmuls in the input dtype, the softmax in fp32."""
    scores_BnTT = (q_BnTd @ k_BnTd.transpose(-1, -2)).float() * q_BnTd.shape[-1] ** -0.5
    if is_causal and mask is None:
        T = q_BnTd.shape[-2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q_BnTd.device).tril()
    if mask is not None:
        scores_BnTT = scores_BnTT.masked_fill(~mask, torch.finfo(torch.float32).min)
    probs_BnTT = torch.softmax(scores_BnTT, dim=-1).to(v_BnTd.dtype)
    if dropout_p > 0.0:
        probs_BnTT = F.dropout(probs_BnTT, dropout_p)
    return probs_BnTT @ v_BnTd


def split_rows_attention(
    q_BnTd: torch.Tensor,
    k_BnTd: torch.Tensor,
    v_BnTd: torch.Tensor,
    mask: torch.Tensor,
    rows: RowSplit,
    is_causal: bool,
    dropout_p: float,
) -> torch.Tensor:
    """Attention of a batch whose `rows.full` carry no padding: those rows run unmasked
    (causal inside the kernel for a causal model), only `rows.padded` carry their mask."""
    full, padded = rows.full, rows.padded
    out_full = F.scaled_dot_product_attention(
        q_BnTd[full], k_BnTd[full], v_BnTd[full], dropout_p=dropout_p, is_causal=is_causal
    )
    out_padded = F.scaled_dot_product_attention(
        q_BnTd[padded], k_BnTd[padded], v_BnTd[padded], attn_mask=mask[padded], dropout_p=dropout_p
    )
    return torch.cat([out_full, out_padded]).index_select(0, rows.order)


def attend(
    q_BnTd: torch.Tensor,
    k_BnTd: torch.Tensor,
    v_BnTd: torch.Tensor,
    ctx: LayerContext,
    dropout_p: float,
) -> torch.Tensor:
    """SDPA, unmasked when the batch has no padding (the flash kernel takes no mask) and
    causal inside the kernel when there is no mask to carry it; with `ctx.rows`, only the
    padded rows carry a mask. bf16 on a CPU without AMX goes through `matmul_attention`
    instead, which is faster there (and masks cost a CPU nothing)."""
    is_causal = ctx.is_causal and ctx.mask is None
    if (
        q_BnTd.device.type == "cpu"
        and q_BnTd.dtype == torch.bfloat16
        and cpu_bf16_attention_by_matmul()
    ):
        return matmul_attention(q_BnTd, k_BnTd, v_BnTd, ctx.mask, is_causal, dropout_p)
    if ctx.rows is not None:
        return split_rows_attention(
            q_BnTd, k_BnTd, v_BnTd, ctx.mask, ctx.rows, ctx.is_causal, dropout_p
        )
    return F.scaled_dot_product_attention(
        q_BnTd, k_BnTd, v_BnTd, attn_mask=ctx.mask, dropout_p=dropout_p, is_causal=is_causal
    )


class SelfAttention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention through SDPA."""

    def __init__(self, cfg: ModelConfig, bias: bool, share_qk: bool = False) -> None:
        super().__init__()
        H, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.dropout = cfg.attention_dropout
        self.q = nn.Linear(H, H, bias=bias)
        # With shared Q/K the key projection is the query projection: no second weight.
        self.k = None if share_qk else nn.Linear(H, cfg.num_kv_heads * d, bias=bias)
        self.v = nn.Linear(H, cfg.num_kv_heads * d, bias=bias)
        self.o = nn.Linear(H, H, bias=bias)

    def forward(self, x_BTH: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        B, T, H = x_BTH.shape
        q_BnTd = (
            project(self.q, "q", x_BTH, ctx)
            .view(B, T, self.num_heads, self.head_dim)
            .transpose(1, 2)
        )
        if self.k is None:
            k_BkTd = q_BnTd
        else:
            k_BkTd = (
                project(self.k, "k", x_BTH, ctx)
                .view(B, T, self.num_kv_heads, self.head_dim)
                .transpose(1, 2)
            )
        v_BkTd = (
            project(self.v, "v", x_BTH, ctx)
            .view(B, T, self.num_kv_heads, self.head_dim)
            .transpose(1, 2)
        )
        if ctx.rope is not None:
            cos_TD, sin_TD = ctx.rope
            q_BnTd = q_BnTd * cos_TD + rotate_half(q_BnTd) * sin_TD
            k_BkTd = k_BkTd * cos_TD + rotate_half(k_BkTd) * sin_TD
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            k_BkTd = k_BkTd.repeat_interleave(repeat, dim=1)
            v_BkTd = v_BkTd.repeat_interleave(repeat, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        out_BnTd = attend(q_BnTd, k_BkTd, v_BkTd, ctx, dropout_p)
        return project(self.o, "o", out_BnTd.transpose(1, 2).reshape(B, T, H), ctx)


# model.hidden_act -> torch's GELU: HF `gelu_new` is the tanh approximation, `gelu` exact.
GELU_APPROXIMATION = {"gelu_new": "tanh", "gelu": "none"}


class GeluMLP(nn.Module):
    """albert FFN: up, GELU (tanh approximation by default), down; with biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = GELU_APPROXIMATION[cfg.hidden_act]

    def forward(self, x_BTH: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        up_BTF = F.gelu(project(self.up, "up", x_BTH, ctx), approximate=self.approximate)
        return project(self.down, "down", up_BTF, ctx)


class SwiGLU(nn.Module):
    """llama FFN: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x_BTH: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        gate_BTF = F.silu(project(self.gate, "gate", x_BTH, ctx))
        return project(self.down, "down", gate_BTF * project(self.up, "up", x_BTH, ctx), ctx)


class PostNormSublayer(nn.Module):
    """h = norm(h + dropout(fn(h))): BERT/ALBERT post-LN."""

    def __init__(self, fn: nn.Module, norm: nn.Module, dropout: float) -> None:
        super().__init__()
        self.fn, self.norm, self.dropout = fn, norm, nn.Dropout(dropout)

    def forward(self, h_BTH: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return self.norm(h_BTH + self.dropout(self.fn(h_BTH, ctx)))


class PreNormSublayer(nn.Module):
    """h = h + dropout(fn(norm(h))): pre-norm, as in Llama."""

    def __init__(self, fn: nn.Module, norm: nn.Module, dropout: float) -> None:
        super().__init__()
        self.fn, self.norm, self.dropout = fn, norm, nn.Dropout(dropout)

    def forward(self, h_BTH: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return h_BTH + self.dropout(self.fn(self.norm(h_BTH), ctx))


@dataclass(frozen=True)
class BlockFamily:
    """The layers of a family's blocks: residual style, norm, MLP, biases, positions."""

    sublayer: type[nn.Module]
    norm: Callable[[int, float], nn.Module]
    mlp: Callable[[ModelConfig], nn.Module]
    bias: bool
    learned_positions: bool
    """Absolute position table in the embedding (albert) instead of RoPE (llama)."""
    embedding_norm: bool
    """LayerNorm(E) in the embedding; llama's is purely linear so that it folds on export."""
    final_norm: bool
    """A norm after the last layer (pre-norm stacks need one)."""

    def attention_sublayer(self, cfg: ModelConfig, share_qk: bool = False) -> nn.Module:
        attn = SelfAttention(cfg, bias=self.bias, share_qk=share_qk)
        return self.sublayer(attn, self.norm(cfg.hidden_size, cfg.norm_eps), cfg.dropout)

    def ffn_sublayer(self, cfg: ModelConfig) -> nn.Module:
        return self.sublayer(self.mlp(cfg), self.norm(cfg.hidden_size, cfg.norm_eps), cfg.dropout)


ALBERT_BLOCKS = BlockFamily(
    sublayer=PostNormSublayer,
    norm=lambda dim, eps: nn.LayerNorm(dim, eps=eps),
    mlp=GeluMLP,
    bias=True,
    learned_positions=True,
    embedding_norm=True,
    final_norm=False,
)
LLAMA_BLOCKS = BlockFamily(
    sublayer=PreNormSublayer,
    norm=RMSNorm,
    mlp=SwiGLU,
    bias=False,
    learned_positions=False,
    embedding_norm=False,
    final_norm=True,
)
