"""Parameter and FLOP accounting for shared-layer models.

Unique parameters count every tensor once, however many layers use it. Effective
parameters count it once per use, as if the stack were unrolled. FLOPs are counted per
layer application, not as 6 x unique parameters, which would undercount a shared stack by
its reuse factor: 2 FLOPs per multiply-accumulate forward, 3x that for forward + backward,
attention scores included (QK^T and AV over the full T x T square, causal or not).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from pretrain.config import Config
from pretrain.model.transformer import SharedTransformer

TRAIN_FLOPS_PER_FORWARD = 3  # backward costs twice the forward


def _params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _linear_flops(module: nn.Module | None) -> int:
    """Forward FLOPs per token of every nn.Linear inside `module`."""
    if module is None:
        return 0
    return sum(2 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@dataclass
class Component:
    name: str
    unique_params: int
    effective_params: int
    flops_per_token: float
    """Forward + backward FLOPs per training token."""


@dataclass
class Accounting:
    seq_length: int
    components: list[Component] = field(default_factory=list)

    @property
    def unique_params(self) -> int:
        return sum(c.unique_params for c in self.components)

    @property
    def effective_params(self) -> int:
        return sum(c.effective_params for c in self.components)

    @property
    def flops_per_token(self) -> float:
        return sum(c.flops_per_token for c in self.components)

    def to_dict(self) -> dict:
        return {
            "unique_params": self.unique_params,
            "effective_params": self.effective_params,
            "flops_per_token": self.flops_per_token,
            "seq_length": self.seq_length,
            "components": [asdict(c) for c in self.components],
        }


def count(model: SharedTransformer, seq_length: int, predicted_fraction: float = 1.0) -> Accounting:
    """Account for `model` on sequences of `seq_length` tokens.

    `predicted_fraction` is the share of positions whose token logits are computed (MLM
    evaluates its head only at masked positions; causal LM at every position).
    """
    plan, enc = model.plan, model.encoder
    T, H = seq_length, model.cfg.hidden_size
    k = TRAIN_FLOPS_PER_FORWARD
    acc = Accounting(seq_length=seq_length)

    def add(name: str, unique: int, effective: int, forward_flops: float) -> None:
        acc.components.append(Component(name, unique, effective, k * forward_flops))

    emb = model.embeddings
    add("embeddings", _params(emb), _params(emb), _linear_flops(emb.project))
    add(
        "blocks.attention",
        _params(enc.attention),
        sum(_params(enc.attention[s]) for s in plan.attention),
        sum(_linear_flops(enc.attention[s]) + 4 * T * H for s in plan.attention),
    )
    add(
        "blocks.ffn",
        _params(enc.ffn),
        sum(_params(enc.ffn[s]) for s in plan.ffn),
        sum(_linear_flops(enc.ffn[s]) for s in plan.ffn),
    )
    if len(enc.deltas):  # relaxed sharing: each layer's own low-rank updates, used once
        add("blocks.deltas", _params(enc.deltas), _params(enc.deltas), _linear_flops(enc.deltas))
    if enc.act is not None:  # counted at the maximum number of steps
        L = plan.num_layers
        add("blocks.halting", _params(enc.act), L * _params(enc.act), L * _linear_flops(enc.act))
    if model.final_norm is not None:
        add("blocks.final_norm", _params(model.final_norm), _params(model.final_norm), 0)
    head = model.head
    add("heads.token", _params(head), _params(head), predicted_fraction * head.forward_flops(emb))
    if model.sop_head is not None:  # one classification per sequence
        sop = model.sop_head
        add("heads.sop", _params(sop), _params(sop), _linear_flops(sop) / T)
    return acc


def predicted_fraction(cfg: Config) -> float:
    """Share of positions whose token logits a training step computes: the masked ones for
    MLM (as many as ALBERT masks, capped at max_predictions), all of them for causal LM."""
    if cfg.model.causal:
        return 1.0
    T = cfg.data.seq_length
    per_sequence = min(cfg.objective.max_predictions, max(1, round(T * cfg.objective.mask_prob)))
    return per_sequence / T


def account(cfg: Config) -> Accounting:
    """Accounting for one training token of `cfg` (model built on the meta device)."""
    with torch.device("meta"):
        model = SharedTransformer(cfg.model)
    return count(model, cfg.data.seq_length, predicted_fraction(cfg))
