"""A model's weights under another sharing plan, and the same function without sharing.

`reshare` is what `SharedTransformer.share_params` and `pretrain convert --from-hf ...
--reshare` both run. It starts from the model's unrolled weights (every layer's own, its
set's weights plus its low-rank deltas if it has any), so a model that already shares is
converted as well as an unshared one:

- each parameter set of the new plan is the mean of the layers it serves;
- under relaxed sharing (ratio < 1), layer i of the range starts its low-rank delta of each
  shared linear from the truncated SVD of W_i - W_shared, as in Relaxed Recursive
  Transformers (Bae et al., 2024): the rank `build_deltas` chooses for the ratio keeps the
  largest singular directions, so a ratio near 1 falls back towards the mean and a rank as
  large as the weight reproduces W_i exactly.

Norms and biases have no per-layer delta: a shared set holds their mean, so the model is
reproduced exactly only where the layers it merges agree on them (a freshly initialised
model does; `ShareReport.other_error` says how far a trained one is from it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pretrain.config import ConfigError, ModelConfig, SharingConfig
from pretrain.model.encoder import SharedEncoder
from pretrain.sharing import COMPONENTS, SharingPlan

State = dict[str, torch.Tensor]
SETS = tuple(f"encoder.{component}." for component in COMPONENTS)
DELTAS = "encoder.deltas."


def fold_deltas(state: Mapping[str, torch.Tensor], plan: SharingPlan) -> State:
    """The encoder of any plan without sharing: layer i gets its set's weights plus its own
    low-rank delta (up @ down) if it has one, stored as its own set i."""
    out = {k: v for k, v in state.items() if not k.startswith((*SETS, DELTAS))}
    for i in range(plan.num_layers):
        for component in COMPONENTS:
            prefix = f"encoder.{component}.{plan.table(component)[i]}."
            for key, tensor in state.items():
                if not key.startswith(prefix):
                    continue
                name = key[len(prefix) :]  # e.g. fn.q.weight
                role = name.split(".")[1] if name.startswith("fn.") else ""
                up = state.get(f"{DELTAS}{i}.{role}.up.weight")
                if up is not None and name.endswith(".weight"):
                    tensor = tensor + up @ state[f"{DELTAS}{i}.{role}.down.weight"]
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


@dataclass
class ShareReport:
    """What a conversion to another sharing plan did."""

    before: str
    """The old plan in words."""
    after: str
    """The new plan in words."""
    params_before: int
    """Unique parameters before."""
    params_after: int
    """Unique parameters after."""
    ranks: dict[str, int]
    """Under relaxed sharing, the rank each role's deltas hold (the rank chosen for the
    ratio, or the weight's own where that is smaller); empty for pure sharing."""
    weight_error: dict[int, float]
    """Layer -> ||W' - W||_F / ||W||_F over the layer's linear weights, W' the weights it
    computes with now (its set's plus its delta)."""
    other_error: dict[int, float]
    """Layer -> the same over its norms and biases, which have no delta (0 where the layers
    merged into a set agree on them)."""

    def lines(self) -> list[str]:
        share = self.params_after / self.params_before
        out = [
            f"sharing {self.before} -> {self.after}: {self.params_before:,} -> "
            f"{self.params_after:,} unique parameters ({share:.0%})"
        ]
        if self.ranks:
            out.append(
                "delta ranks (SVD of each layer minus its set): "
                + ", ".join(f"{role} {rank}" for role, rank in self.ranks.items())
            )
        out.append(
            "relative weight error per layer: "
            + " ".join(f"{i}:{e:.2g}" for i, e in self.weight_error.items())
        )
        if any(self.other_error.values()):
            out.append(
                "relative norm/bias error per layer (averaged, no delta): "
                + " ".join(f"{i}:{e:.2g}" for i, e in self.other_error.items())
            )
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].clone()
    dtype = tensors[0].dtype
    wide = torch.promote_types(dtype, torch.float32)
    return torch.stack([t.to(wide) for t in tensors]).mean(0).to(dtype)


def _svd_delta(
    diff: torch.Tensor, rank: int, fill: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(up, down, kept) with up @ down the best rank-`rank` approximation of `diff`: up holds
    U S, down the orthonormal rows V^T (so a zero difference still leaves `down` nonzero,
    and the delta trains as a fresh one would). Rows beyond the weight's own rank come from
    `fill`, their `up` columns zero."""
    wide = torch.promote_types(diff.dtype, torch.float32)
    U, S, Vh = torch.linalg.svd(diff.to(wide), full_matrices=False)
    kept = min(rank, S.numel())
    up = torch.zeros(diff.shape[0], rank, dtype=wide, device=diff.device)
    down = fill.to(wide).clone()
    up[:, :kept] = U[:, :kept] * S[:kept]
    down[:kept] = Vh[:kept]
    return up.to(diff.dtype), down.to(diff.dtype), kept


def _layer_error(old: State, new: State, layer: int, linear: bool) -> float:
    """Relative Frobenius error of one unrolled layer's linear weights (or of the rest)."""
    num = den = 0.0
    prefixes = tuple(f"encoder.{c}.{layer}." for c in COMPONENTS)
    for key, tensor in old.items():
        if not key.startswith(prefixes):
            continue
        is_linear = ".fn." in key and key.endswith(".weight")
        if is_linear != linear:
            continue
        ref = tensor.double()
        num += (new[key].double() - ref).square().sum().item()
        den += ref.square().sum().item()
    return math.sqrt(num / den) if den else math.sqrt(num)


def reshare(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig, sharing: SharingConfig
) -> tuple[State, ModelConfig, ShareReport]:
    """`state` of a model of `cfg` -> the state of the same model under `sharing`, its
    config, and what changed. Raises ConfigError, before any work, for a plan the model
    cannot take (the config's checks, a ratio that leaves no rank, or shared Q/K asked of a
    model with separate query and key projections)."""
    old_plan = SharingPlan.from_config(cfg)
    if sharing.share_qk and not old_plan.share_qk:
        raise ConfigError(
            "sharing.share_qk: this model has separate query and key projections, and one"
            " projection for both cannot reproduce them; keep sharing.share_qk=false (shared"
            " Q/K is a choice made before training)"
        )
    new_cfg = dataclasses.replace(cfg, sharing=sharing)
    plan = SharingPlan.from_config(new_cfg)
    with torch.device("meta"):  # the target's keys, shapes and delta rank; no memory
        target = {
            f"encoder.{k}": v
            for k, v in SharedEncoder(new_cfg, cfg.spec.block_family()).state_dict().items()
        }
    flat = fold_deltas(state, old_plan)
    if old_plan.share_qk and not plan.share_qk:  # keys were the queries: exact
        for key in [k for k in flat if ".fn.q." in k]:
            flat[key.replace(".fn.q.", ".fn.k.")] = flat[key]

    out = {k: v for k, v in flat.items() if not k.startswith(SETS)}
    for component in COMPONENTS:
        table = plan.table(component)
        prefix = f"encoder.{component}.0."
        names = [k[len(prefix) :] for k in flat if k.startswith(prefix)]
        for s in sorted(set(table)):
            layers = [i for i in range(plan.num_layers) if table[i] == s]
            for name in names:
                out[f"encoder.{component}.{s}.{name}"] = _mean(
                    [flat[f"encoder.{component}.{i}.{name}"] for i in layers]
                )

    ranks: dict[str, int] = {}
    fill = torch.Generator().manual_seed(0)
    for key, like in target.items():
        if not (key.startswith(DELTAS) and key.endswith(".down.weight")):
            continue
        layer, role = key[len(DELTAS) :].split(".")[:2]
        i = int(layer)
        for component in plan.components:
            shared_key = f"encoder.{component}.{plan.table(component)[i]}.fn.{role}.weight"
            if shared_key in out:
                break
        own = flat[f"encoder.{component}.{i}.fn.{role}.weight"]
        noise = torch.randn(like.shape, generator=fill) * cfg.initializer_range
        up, down, kept = _svd_delta(own - out[shared_key], like.shape[0], noise.to(own.device))
        out[f"{DELTAS}{i}.{role}.up.weight"] = up
        out[key] = down
        ranks[role] = kept

    got = {k for k in out if k.startswith("encoder.")}
    if got != set(target):
        raise RuntimeError(f"reshare built {sorted(got ^ set(target))} unlike the target plan")
    after = fold_deltas(out, plan)
    layers = range(plan.num_layers)
    report = ShareReport(
        before=old_plan.description,
        after=plan.description,
        params_before=sum(v.numel() for v in state.values()),
        params_after=sum(v.numel() for v in out.values()),
        ranks=ranks,
        weight_error={i: _layer_error(flat, after, i, linear=True) for i in layers},
        other_error={i: _layer_error(flat, after, i, linear=False) for i in layers},
    )
    return out, new_cfg, report
