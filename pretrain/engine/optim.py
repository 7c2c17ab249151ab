"""Optimizers and the learning-rate schedule, in plain torch.

Weight decay goes only to the matrices of linear maps; norms, biases and embedding tables
are left alone, as in BERT/ALBERT. LAMB is the optimizer ALBERT was pretrained with; the
schedule is a multiplier of the peak learning rate, wrapped in a LambdaLR so that its
position travels with checkpoints.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import OptimConfig


def _decayed_ids(model: nn.Module) -> set[int]:
    """Identities of the parameters that get weight decay: nn.Linear weight matrices
    (LowRankDelta's factors included), unless the same tensor is also an embedding table."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    # A table tied to a linear map stays undecayed: it is an embedding first.
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return linear - tables


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the parameters into a decayed and an undecayed group.

    Args:
        model: The model; every parameter is listed once, even one shared by several
            modules.
        weight_decay: Decay of the first group; the second has none.

    Returns:
        Up to two groups `{"params", "weight_decay"}`, decayed first; empty ones dropped.
    """
    decayed_ids = _decayed_ids(model)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    # parameters() yields each tensor once, however many modules hold it.
    for p in model.parameters():
        (decay if id(p) in decayed_ids and p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


@dataclass(frozen=True)
class Partition:
    """One rank's flat slice of a parameter group, as ZeRO hands it to the optimizer.

    The slice is `owners.numel()` runs laid end to end: run r is `lengths[r]` elements of
    the tensor `owners[r]` (its index within the group; `tensors` marks padding). A
    per-tensor sum over the slice is a sum per run and one index_add over the runs, and over
    the whole tensor one all-reduce of those sums over `group`, run on `device` (where the
    collective backend takes tensors: the accelerator even when the slice is offloaded). The
    map costs O(tensors), not an index per element.
    """

    owners: torch.Tensor  # (R,) int64
    lengths: torch.Tensor  # (R,) int64, every run non-empty, summing to the slice's numel
    tensors: int
    group: Any  # torch.distributed.ProcessGroup
    device: torch.device

    @classmethod
    def from_pieces(
        cls, numel: int, pieces: Iterable[tuple[int, int, int]], tensors: int, group, device
    ) -> Partition:
        """From (start, length, tensor index) of each tensor's piece of a slice of `numel`
        elements on `device`; the elements no piece covers are padding."""
        owners, lengths, at = [], [], 0
        for start, length, index in sorted(p for p in pieces if p[1] > 0):
            if start > at:
                owners.append(tensors)
                lengths.append(start - at)
            owners.append(index)
            lengths.append(length)
            at = start + length
        if at < numel:
            owners.append(tensors)
            lengths.append(numel - at)
        on = {"dtype": torch.long, "device": device}
        return cls(torch.tensor(owners, **on), torch.tensor(lengths, **on), tensors, group, device)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning").

    Adam moments with bias correction give u = m_hat / (sqrt(v_hat) + eps) + wd * w; each
    tensor then moves by lr * r * u with the trust ratio r = ||w|| / ||u|| (1 when either
    norm is 0). New moments are fp32 whatever the parameter dtype (torch's load_state_dict
    casts them to it; DeepSpeed's fp32 master weights keep them fp32).

    The trust ratio is per tensor. Under ZeRO (and DeepSpeed's bf16 optimizer) the optimizer
    is handed flat partitions instead, each holding pieces of many tensors and a tensor's
    pieces spread over ranks: `partitions` (set by the engine, keyed by id of the flat
    tensor) says which tensor each element belongs to, and the norms are summed per tensor
    across the ranks before the ratio is taken.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(
                f"Lamb: lr ({lr}), eps ({eps}) and weight_decay ({weight_decay}) must be >= 0"
            )
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas ({list(betas)}) must each be in [0, 1)")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.partitions: dict[int, Partition] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                # ZeRO gives every rank's flat partition a gradient, so the ranks take part
                # in the same all-reduces in the same order.
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        w, u = p.float(), self._direction(p, group)
        partition = self.partitions.get(id(p))
        if partition is None:
            w_norm, u_norm = w.norm(), u.norm()
        else:
            w_norm, u_norm = _norms_per_tensor(w, u, partition)
        # torch.where, not `if`: no device-to-host sync per tensor on GPU.
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
        if partition is not None:  # each element takes its own tensor's ratio
            ratio = torch.repeat_interleave(
                ratio[partition.owners], partition.lengths, output_size=p.numel()
            )
        p.sub_((u * (group["lr"] * ratio)).to(p.dtype))

    def _direction(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Advance the moments of `p` and return u, the update before the trust ratio."""
        if p.grad.is_sparse:
            raise RuntimeError("Lamb does not support sparse gradients")
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"]
        g = p.grad.float()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        v_hat = v / (1.0 - beta2**t)
        u = (m / (1.0 - beta1**t)) / (v_hat.sqrt() + group["eps"])
        if group["weight_decay"] != 0.0:
            u.add_(p.float(), alpha=group["weight_decay"])
        return u


def _norms_per_tensor(
    w_flat: torch.Tensor, u_flat: torch.Tensor, partition: Partition
) -> tuple[torch.Tensor, torch.Tensor]:
    """||w|| and ||u|| of every tensor with elements in a flat partition, each (tensors + 1,)
    with padding last: squares summed per tensor here, then over the ranks."""
    per_run = torch.stack(
        [
            torch.segment_reduce(x.square(), "sum", lengths=partition.lengths)
            for x in (w_flat, u_flat)
        ]
    )
    sums = torch.zeros(2, partition.tensors + 1, dtype=torch.float32, device=w_flat.device)
    sums.index_add_(1, partition.owners, per_run)
    total = sums.to(partition.device)
    dist.all_reduce(total, group=partition.group)
    w_norm, u_norm = total.to(w_flat.device).sqrt()
    return w_norm, u_norm


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "lamb": Lamb,
}

# Beyond lr, betas and eps. torch's fused AdamW runs on CUDA and CPU alike (its device check
# comes at the first step, after DeepSpeed has placed the fp32 master weights): on this
# 2-core CPU one update of albert-base takes 6.4 ms fused against 29 ms with foreach.
OPTIMIZER_OPTIONS: dict[str, dict] = {"adamw": {"fused": True}}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer over `param_groups(model, cfg.weight_decay)`."""
    return OPTIMIZERS[cfg.name](
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        **OPTIMIZER_OPTIONS.get(cfg.name, {}),
    )


# Fraction of the (1 - min_lr_ratio) range still left at decay progress x in [0, 1].
DECAYS: dict[str, Callable[[float], float]] = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "constant": lambda x: 1.0,
}


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of `cfg.lr` for the update at 0-based optimizer step `step`.

    Warmup rises linearly as (step + 1) / warmup_steps, reaching 1.0 at step
    warmup_steps - 1; decay then falls from 1.0 at that peak (step 0 without warmup) to
    min_lr_ratio at step max_steps - 1, and holds it after.
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.decay == "constant":
        return 1.0
    peak, last = max(warmup - 1, 0), max_steps - 1
    if step <= peak or last <= peak:  # no room left to decay in
        return 1.0
    if step >= last:  # the floor, exactly, from the last step on
        return cfg.min_lr_ratio
    remaining = DECAYS[cfg.decay]((step - peak) / (last - peak))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * remaining


def budget_warmup(cfg: OptimConfig, planned_steps: int, steps: int) -> tuple[int, str | None]:
    """The warmup of a run cut to `steps` from a recipe planned for `planned_steps`: the
    recipe's own where it fits the budget, else the same fraction of the budget, with the
    line that says so (a smoke run of a long recipe still warms up, then decays)."""
    if cfg.warmup_steps <= steps:
        return cfg.warmup_steps, None
    warmup = min(steps, round(cfg.warmup_steps * steps / planned_steps))
    return warmup, (
        f"optim.warmup_steps ({cfg.warmup_steps}) exceeds a budget of {steps} steps: the warmup"
        f" is scaled with it to {warmup} ({cfg.warmup_steps} of the recipe's {planned_steps})"
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`; call its step() after each optimizer step."""
    # Checkpoints hold the step count and base lrs; the factor is rebuilt from the config.
    factor = functools.partial(lr_factor, cfg=cfg, max_steps=max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
