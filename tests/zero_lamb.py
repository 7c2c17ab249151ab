"""LAMB under each DeepSpeed layout against LAMB on whole tensors; run on 2 ranks by
tests/test_optim.py (`torchrun --nproc_per_node=2 tests/zero_lamb.py STAGE:PRECISION ...`).

ZeRO hands the optimizer flat slices in which tensors straddle the ranks. Each step, every
tensor's fp32 master weight before and after the step and its moments after are gathered
whole; the step LAMB should have taken follows from those alone (the moments carry the
gradient), with one trust ratio ||w|| / ||u|| per whole tensor. A ratio taken per slice
moves a straddling tensor by two different ratios and misses by far more than 1e-6.
Prints one JSON line per layout: the largest difference from the whole-tensor step.
"""

from __future__ import annotations

import json
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from helpers import random_ids, tiny_model

from pretrain.config import Config, EngineConfig, OptimConfig
from pretrain.engine import runtime
from pretrain.engine.optim import Lamb, param_groups

STEPS = 3
OPTIM = OptimConfig(
    name="lamb", lr=0.05, weight_decay=0.1, betas=(0.9, 0.99), decay="constant", grad_clip=0.0
)


def whole(param: torch.nn.Parameter, key: str | None = None) -> torch.Tensor:
    full = (
        safe_get_full_fp32_param(param)
        if key is None
        else safe_get_full_optimizer_state(param, key)
    )
    return full.detach().double().clone()


def link_state(ds_optimizer) -> None:
    """ZeRO-1/2 and the bf16 optimizer give each tensor its view of the optimizer state
    after the first group's first step, when a lazily initialised optimizer (torch's, ours)
    has no state for the other groups yet; link again once every group has stepped."""
    if hasattr(ds_optimizer, "_hp_optimizer_states_linked"):
        ds_optimizer._hp_optimizer_states_linked = False
        ds_optimizer._lazy_init_hp_params_optimizer_state()


def expected_step(w, m, v, t: int, lr: float, wd: float) -> torch.Tensor:
    """LAMB's step on one whole tensor from its weight before and its moments after."""
    (b1, b2), eps = OPTIM.betas, OPTIM.eps
    u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps) + wd * w
    w_norm, u_norm = w.norm(), u.norm()
    ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
    return w - lr * ratio * u


def worst_difference(stage: int, precision: str, world) -> float:
    model = tiny_model("albert", seed=0).train()
    decayed = {id(p) for p in param_groups(model, OPTIM.weight_decay)[0]["params"]}
    engine_cfg = EngineConfig(
        zero_stage=stage, precision=precision, micro_batch_size=2, zero3_persistence_threshold=0
    )
    cfg = Config(optim=OPTIM, engine=engine_cfg)
    engine = runtime.initialize(model, cfg, world)
    assert isinstance(engine.optimizer.optimizer, Lamb)
    params = [p for p in model.parameters() if p.requires_grad]
    worst = 0.0
    for t in range(1, STEPS + 1):
        ids = random_ids(batch=2, length=12, seed=100 * world.rank + t).to(world.device)
        logits = engine(ids).logits.float()
        engine.backward(logits.square().mean())
        before = [whole(p) for p in params]
        lr = engine.get_lr()[0]
        engine.step()
        link_state(engine.optimizer)
        for p, w in zip(params, before, strict=True):
            wd = OPTIM.weight_decay if id(p) in decayed else 0.0
            m, v = whole(p, "exp_avg"), whole(p, "exp_avg_sq")
            step = expected_step(w, m, v, t, lr, wd)
            worst = max(worst, (whole(p) - step).abs().max().item())
    engine.destroy()
    return worst


def main(layouts: list[str]) -> None:
    world = runtime.init_distributed()
    for layout in layouts:
        stage, precision = layout.split(":")
        worst = worst_difference(int(stage), precision, world)
        if world.rank == 0:
            print(json.dumps({"layout": layout, "worst": worst}), flush=True)
    runtime.teardown(None)


if __name__ == "__main__":
    main(sys.argv[1:])
