"""Shared pieces of the state-dict adapters: renaming tables applied per logical layer."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from pretrain.errors import UserError
from pretrain.sharing import SharingPlan

State = dict[str, torch.Tensor]
# HF sub-module name (within one layer) -> (our component, our name within that sublayer)
LayerMap = Mapping[str, tuple[str, str]]

SUFFIXES = ("weight", "bias")


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be expressed in the target format, with the reason."""


def rename(src: Mapping[str, torch.Tensor], table: Mapping[str, str]) -> State:
    """Copy `src_prefix.{weight,bias}` to `dst_prefix.{weight,bias}` for every table row
    whose tensors exist."""
    out: State = {}
    for src_prefix, dst_prefix in table.items():
        for suffix in SUFFIXES:
            key = f"{src_prefix}.{suffix}"
            if key in src:
                out[f"{dst_prefix}.{suffix}"] = src[key]
    return out


def our_layer_key(plan: SharingPlan, layer: int, component: str, name: str) -> str:
    return f"encoder.{component}.{plan.table(component)[layer]}.{name}"


def layers_from_hf(
    hf_state: Mapping[str, torch.Tensor],
    plan: SharingPlan,
    hf_prefix: Callable[[int], str],
    layer_map: LayerMap,
) -> State:
    """Gather each logical layer's HF tensors into the parameter set the plan assigns it.
    Layers that share a set must hold equal tensors; anything else is a ConversionError."""
    out: State = {}
    source: dict[str, str] = {}
    for layer in range(plan.num_layers):
        for hf_name, (component, name) in layer_map.items():
            for suffix in SUFFIXES:
                hf_key = f"{hf_prefix(layer)}{hf_name}.{suffix}"
                if hf_key not in hf_state:
                    continue
                key = f"{our_layer_key(plan, layer, component, name)}.{suffix}"
                tensor = hf_state[hf_key]
                if key in out and not torch.equal(out[key], tensor):
                    raise ConversionError(
                        f"{hf_key} differs from {source[key]}, but the sharing plan gives"
                        f" both to {key}; convert with a plan that keeps them apart"
                    )
                out[key], source[key] = tensor, hf_key
    return out


def layers_to_hf(
    state: Mapping[str, torch.Tensor],
    plan: SharingPlan,
    hf_layers: list[int],
    hf_prefix: Callable[[int], str],
    layer_map: LayerMap,
) -> State:
    """Write HF layer j from the sets that logical layer `hf_layers[j]` uses."""
    out: State = {}
    for j, layer in enumerate(hf_layers):
        for hf_name, (component, name) in layer_map.items():
            for suffix in SUFFIXES:
                key = f"{our_layer_key(plan, layer, component, name)}.{suffix}"
                if key in state:
                    out[f"{hf_prefix(j)}{hf_name}.{suffix}"] = state[key]
    return out


def check_identity_projection(
    weight: torch.Tensor | None, bias: torch.Tensor | None, what: str
) -> None:
    """Our model drops the E -> H projection when E == H; importing one is exact only if
    it is the identity."""
    if weight is None:
        return
    eye = torch.eye(weight.shape[0], dtype=weight.dtype)
    if not torch.equal(weight, eye) or (bias is not None and bool(bias.abs().max() > 0)):
        raise ConversionError(
            f"{what} has embedding_size == hidden_size but a non-identity embedding"
            " projection, which this model (no projection when E == H) cannot hold"
        )


def identity_projection(dim: int, dtype: torch.dtype, bias: bool) -> State:
    out = {"weight": torch.eye(dim, dtype=dtype)}
    if bias:
        out["bias"] = torch.zeros(dim, dtype=dtype)
    return out
