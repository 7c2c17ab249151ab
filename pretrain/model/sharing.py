"""Cross-layer sharing as data: a plan mapping each logical layer to a parameter set.

A strategy maps logical layer i in [0, L) to a set index; the plan applies it inside the
configured layer range and scope, gives every layer outside them its own set, and numbers
the sets in order of first use. The encoder then owns one module per set and asks the plan
which one a layer uses; it never branches on the strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pretrain.config import ModelConfig

Strategy = Callable[[int, int], list[int]]


def _none(L: int, M: int) -> list[int]:
    return list(range(L))


def _all(L: int, M: int) -> list[int]:
    return [0] * L


def _sequence(L: int, M: int) -> list[int]:
    # ALBERT groups / "immediate block-wise repeat": L/M consecutive layers per set.
    return [i * M // L for i in range(L)]


def _cycle(L: int, M: int) -> list[int]:
    return [i % M for i in range(L)]


def _cycle_rev(L: int, M: int) -> list[int]:
    # Cycle through the sets, then walk the last M layers back through them in reverse.
    return [i % M for i in range(L - M)] + list(range(M - 1, -1, -1))


STRATEGIES: dict[str, Strategy] = {
    "none": _none,
    "all": _all,
    "sequence": _sequence,
    "cycle": _cycle,
    "cycle_rev": _cycle_rev,
}


def _renumber(keys: list[tuple[str, int]]) -> tuple[int, ...]:
    """Number distinct keys 0, 1, ... in order of first appearance."""
    ids: dict[tuple[str, int], int] = {}
    return tuple(ids.setdefault(key, len(ids)) for key in keys)


@dataclass(frozen=True)
class SharingPlan:
    """Which parameter set each logical layer uses, per block component.

    `attention[i]` and `ffn[i]` are set indices for layer i; a component outside the
    sharing scope has one set per layer.
    """

    attention: tuple[int, ...]
    ffn: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SharingPlan:
        s, L = cfg.sharing, cfg.num_layers
        end = L - 1 if s.end is None else s.end
        local = STRATEGIES[s.strategy](end - s.start + 1, s.num_sets or 1)
        shared = _renumber(
            [
                ("shared", local[i - s.start]) if s.start <= i <= end else ("own", i)
                for i in range(L)
            ]
        )
        own = tuple(range(L))
        return cls(
            attention=shared if s.scope in ("block", "attention") else own,
            ffn=shared if s.scope in ("block", "ffn") else own,
        )

    @property
    def num_layers(self) -> int:
        return len(self.attention)

    @property
    def num_attention_sets(self) -> int:
        return max(self.attention) + 1

    @property
    def num_ffn_sets(self) -> int:
        return max(self.ffn) + 1

    def group_count(self) -> int | None:
        """G when the plan is ALBERT's grouping (layer i -> group i*G//L for the whole
        block), else None. `none` is G = L and `all` is G = 1."""
        if self.attention != self.ffn:
            return None
        G, L = self.num_attention_sets, self.num_layers
        return G if L % G == 0 and self.attention == tuple(_sequence(L, G)) else None
