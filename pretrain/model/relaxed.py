"""Relaxed sharing: per-layer low-rank deltas on top of shared weights.

Inside the shared range, layer i computes every shared linear as W x + B_i A_i x, with
W shared and the rank-r pair (A_i, B_i) its own. B_i starts at zero, so training starts
from pure sharing. The rank is the largest that keeps the shared sets at least a fraction
`ratio` of the range's parameters (shared sets + deltas).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config import ConfigError
from pretrain.sharing import SharingPlan


class LowRankDelta(nn.Module):
    """x -> up(down(x)), a rank-r update of one (out x in) linear weight."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def penalty(self) -> torch.Tensor:
        """||up @ down||_F^2 without forming the (out x in) product."""
        u, d = self.up.weight, self.down.weight  # (out, r), (r, in)
        return ((u.T @ u) * (d @ d.T)).sum()


def _linears(sublayer: nn.Module) -> dict[str, nn.Linear]:
    """The weight matrices of a sublayer by role (q, k, v, o, gate, up, down)."""
    return {n: m for n, m in sublayer.fn.named_children() if isinstance(m, nn.Linear)}


def build_deltas(plan: SharingPlan, sets: dict[str, nn.ModuleList]) -> nn.ModuleDict:
    """`{str(layer): {role: LowRankDelta}}` for every layer of the shared range, given each
    component's parameter sets (`{"attention": ..., "ffn": ...}`); empty for pure sharing."""
    if not plan.relaxed:
        return nn.ModuleDict()
    layers = plan.shared_layers
    shared_params, roles = 0, {}
    for component in plan.components:
        table = plan.table(component)
        used = sorted({table[i] for i in layers})
        shared_params += sum(p.numel() for k in used for p in sets[component][k].parameters())
        roles.update(_linears(sets[component][used[0]]))  # a component's sets share shapes
    cost_per_rank = len(layers) * sum(lin.in_features + lin.out_features for lin in roles.values())
    rank = int(shared_params * (1.0 - plan.ratio) / plan.ratio // cost_per_rank)
    if rank < 1:
        most = shared_params / (shared_params + cost_per_rank)
        raise ConfigError(
            f"sharing.ratio ({plan.ratio}) leaves no room for a rank-1 delta per layer in this"
            f" model; use sharing.ratio <= {math.floor(most * 1000) / 1000} or 1.0"
        )
    return nn.ModuleDict(
        {
            str(i): nn.ModuleDict(
                {
                    r: LowRankDelta(lin.in_features, lin.out_features, rank)
                    for r, lin in roles.items()
                }
            )
            for i in layers
        }
    )
