"""The fused gradient norm of ZeRO-1/2 (pretrain/engine/fused.py) against DeepSpeed's own;
run on 2 ranks by tests/test_engine.py (`torchrun --nproc_per_node=2 tests/zero_norm.py
STAGE:PRECISION ...`).

Each layout takes a few steps of a tiny model with clipping on: at every step the fused norm
and DeepSpeed's own are computed on the same reduced gradients (the step clips with the
fused one). Then a step whose gradients hold inf and NaN must be skipped as an overflow,
the weights left as they were. Prints one JSON line per layout.
"""

from __future__ import annotations

import json
import sys

import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from helpers import random_ids, tiny_model

from pretrain.config import Config, EngineConfig, OptimConfig
from pretrain.engine import runtime

STEPS = 3
OPTIM = OptimConfig(lr=0.01, decay="constant", warmup_steps=0, grad_clip=0.02)


def loss_of(engine, world, seed: int, scale: float = 1.0) -> torch.Tensor:
    ids = random_ids(batch=2, length=12, seed=100 * world.rank + seed).to(world.device)
    return engine(ids).logits.float().square().mean() * scale


def check_layout(stage: int, precision: str, world) -> dict:
    model = tiny_model("albert", seed=0).train()
    engine_cfg = EngineConfig(zero_stage=stage, precision=precision, micro_batch_size=2)
    engine = runtime.initialize(model, Config(optim=OPTIM, engine=engine_cfg), world)
    optimizer = engine.optimizer
    names = ("scaled_global_norm", "check_overflow", "buffered_reduce_fallback")
    installed = {name: name in vars(optimizer) for name in names}
    fused = optimizer.scaled_global_norm
    pairs = []

    def both(norm_type=2):
        ours = fused(norm_type)
        pairs.append((float(ours), float(DeepSpeedZeroOptimizer.scaled_global_norm(optimizer))))
        return ours

    optimizer.scaled_global_norm = both
    for t in range(1, STEPS + 1):
        engine.backward(loss_of(engine, world, t))
        engine.step()
    before = [p.detach().float().clone() for p in model.parameters()]
    # inf on one rank, NaN on the other: both ranks must skip the step.
    engine.backward(loss_of(engine, world, 0, float("inf") if world.rank == 0 else float("nan")))
    engine.step()
    unchanged = all(
        torch.equal(p.detach().float(), b) for p, b in zip(model.parameters(), before, strict=True)
    )
    row = {
        "layout": f"{stage}:{precision}",
        "installed": installed,
        "norms": pairs,
        "skipped": bool(optimizer.overflow),
        "unchanged": unchanged,
    }
    engine.destroy()
    return row


def main(layouts: list[str]) -> None:
    world = runtime.init_distributed()
    for layout in layouts:
        stage, precision = layout.split(":")
        row = check_layout(int(stage), precision, world)
        if world.rank == 0:
            print(json.dumps(row), flush=True)
    runtime.teardown(None)


if __name__ == "__main__":
    main(sys.argv[1:])
