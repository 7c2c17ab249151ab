"""Shared pieces of the state-dict adapters: renaming tables applied per logical layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch

from pretrain.config import ModelConfig, SharingConfig
from pretrain.errors import UserError
from pretrain.sharing import COMPONENTS, SharingPlan

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


def fold_deltas(state: Mapping[str, torch.Tensor], plan: SharingPlan) -> State:
    """The encoder of a relaxed plan without sharing: layer i gets its set's weights plus its
    own low-rank delta (up @ down), stored as its own set i."""
    out = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    for i in range(plan.num_layers):
        for component in COMPONENTS:
            prefix = f"encoder.{component}.{plan.table(component)[i]}."
            for key, tensor in state.items():
                if not key.startswith(prefix):
                    continue
                name = key[len(prefix) :]  # e.g. fn.q.weight
                role = name.split(".")[1] if name.startswith("fn.") else ""
                up = state.get(f"encoder.deltas.{i}.{role}.up.weight")
                if up is not None and name.endswith(".weight"):
                    tensor = tensor + up @ state[f"encoder.deltas.{i}.{role}.down.weight"]
                out[f"encoder.{component}.{i}.{name}"] = tensor
    return out


def fold_relaxed(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> tuple[State, ModelConfig]:
    """Relaxed sharing -> the same function without sharing (`fold_deltas`) and its config;
    pure sharing is returned unchanged."""
    plan = SharingPlan.from_config(cfg)
    if not plan.relaxed:
        return dict(state), cfg
    flat = dataclasses.replace(cfg, sharing=SharingConfig(strategy="none", share_qk=plan.share_qk))
    return fold_deltas(state, plan), flat


def compress(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig, sharing: SharingConfig
) -> tuple[State, ModelConfig]:
    """An unshared (or less shared) model -> `sharing`: each new parameter set is the mean
    of the layers the new plan maps to it."""
    new_cfg = dataclasses.replace(cfg, sharing=sharing)
    old, new = SharingPlan.from_config(cfg), SharingPlan.from_config(new_cfg)
    out = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    for component in COMPONENTS:
        old_table, new_table = old.table(component), new.table(component)
        prefix = f"encoder.{component}.{old_table[0]}."
        names = [k[len(prefix) :] for k in state if k.startswith(prefix)]
        for s in set(new_table):
            layers = [i for i in range(new.num_layers) if new_table[i] == s]
            for name in names:
                tensors = [state[f"encoder.{component}.{old_table[i]}.{name}"] for i in layers]
                out[f"encoder.{component}.{s}.{name}"] = torch.stack(tensors).mean(0)
    return out, new_cfg
