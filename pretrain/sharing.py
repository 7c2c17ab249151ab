"""Cross-layer sharing as data: the strategies, and the plan mapping layers to parameter sets.

A strategy maps logical layer i of a range of n layers to one of M sets; the plan applies
it inside the configured layer range and scope, gives every layer outside them its own
set, and numbers the sets in order of first use. The encoder owns one module per set and
asks the plan which one a layer uses; it never branches on the strategy.

This module is the only reader of `model.sharing` and imports no torch, so the config
validates against the same registry the model is built from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretrain.config import ModelConfig, SharingConfig

COMPONENTS = ("attention", "ffn")
"""The sublayers of a block, each with its own set table."""


@dataclass(frozen=True)
class Strategy:
    """How the n layers of the shared range map to M sets, and what n and M it needs."""

    assign: Callable[[int, int], list[int]]
    """(n, M) -> the set of each layer of the range."""
    takes_sets: bool = True
    """Whether sharing.num_sets (M) chooses anything; without it the strategy fixes M."""
    layers_per_set: int = 1
    """The range must hold at least this many layers per set."""
    equal_runs: bool = False
    """The range must split into M runs of equal length."""


def _none(n: int, M: int) -> list[int]:
    return list(range(n))


def _all(n: int, M: int) -> list[int]:
    return [0] * n


def _sequence(n: int, M: int) -> list[int]:
    # ALBERT groups / "immediate block-wise repeat": n/M consecutive layers per set.
    return [i * M // n for i in range(n)]


def _cycle(n: int, M: int) -> list[int]:
    return [i % M for i in range(n)]


def _cycle_rev(n: int, M: int) -> list[int]:
    # Cycle through the sets, then walk the last M layers back through them in reverse.
    return [i % M for i in range(n - M)] + list(range(M - 1, -1, -1))


STRATEGIES: dict[str, Strategy] = {
    "none": Strategy(_none, takes_sets=False),
    "all": Strategy(_all, takes_sets=False),
    "sequence": Strategy(_sequence, equal_runs=True),
    "cycle": Strategy(_cycle),
    "cycle_rev": Strategy(_cycle_rev, layers_per_set=2),
}


def shared_range(sharing: SharingConfig, num_layers: int) -> range:
    """The logical layers the strategy applies to: start..end inclusive, end defaulting to
    the last layer."""
    end = num_layers - 1 if sharing.end is None else sharing.end
    return range(sharing.start, end + 1)


def shared_components(sharing: SharingConfig) -> tuple[str, ...]:
    """The sublayers the scope shares: both for a block, else the one it names."""
    return COMPONENTS if sharing.scope == "block" else (sharing.scope,)


def _describe(s: SharingConfig, layers: range, num_layers: int) -> str:
    words = [s.strategy] + ([f"M={s.num_sets}"] if s.num_sets else []) + [f"scope={s.scope}"]
    if len(layers) != num_layers:
        words.append(f"layers {layers.start}..{layers.stop - 1}")
    if s.ratio < 1.0:
        words.append(f"ratio={s.ratio:g}")
    if s.share_qk:
        words.append("shared Q/K")
    return " ".join(words)


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
    shared_layers: range = range(0)
    """The layers the strategy applies to."""
    components: tuple[str, ...] = ()
    """The components shared inside that range."""
    ratio: float = 1.0
    """Relaxed sharing below 1: the shared sets' fraction of the range's parameters, the
    rest spent on per-layer low-rank deltas."""
    tie_penalty: float = 0.0
    """Weight of the L2 penalty on those deltas."""
    share_qk: bool = False
    """One projection for queries and keys inside each layer."""
    description: str = "none"
    """The plan in words, for tables and messages: `cycle M=2 scope=block layers 0..11`."""

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SharingPlan:
        s, L = cfg.sharing, cfg.num_layers
        layers = shared_range(s, L)
        local = STRATEGIES[s.strategy].assign(len(layers), s.num_sets or 1)
        shared = _renumber(
            [("shared", local[i - layers.start]) if i in layers else ("own", i) for i in range(L)]
        )
        components = shared_components(s)
        own = tuple(range(L))
        return cls(
            attention=shared if "attention" in components else own,
            ffn=shared if "ffn" in components else own,
            shared_layers=layers,
            components=components,
            ratio=s.ratio,
            tie_penalty=s.tie_penalty,
            share_qk=s.share_qk,
            description=_describe(s, layers, L),
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

    @property
    def reuses(self) -> bool:
        """Whether some parameter set runs at more than one layer application."""
        return self.num_attention_sets < self.num_layers or self.num_ffn_sets < self.num_layers

    @property
    def relaxed(self) -> bool:
        """Whether the layers of the range add their own low-rank deltas to the shared sets."""
        return self.ratio < 1.0

    def table(self, component: str) -> tuple[int, ...]:
        """The set of each layer for `component` ("attention" or "ffn")."""
        return self.attention if component == "attention" else self.ffn

    def group_count(self) -> int | None:
        """G when the plan is ALBERT's grouping (layer i -> group i*G//L for the whole
        block, no deltas), else None. `none` is G = L and `all` is G = 1."""
        if self.attention != self.ffn or self.relaxed:
            return None
        G, L = self.num_attention_sets, self.num_layers
        return G if L % G == 0 and self.attention == tuple(_sequence(L, G)) else None
