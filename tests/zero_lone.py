"""ZeRO-1/2 on one rank without DeepSpeed's reduction of a rank with itself
(pretrain/engine/fused.py: skip_lone_reduction) against the same run with it; run on one
rank by tests/test_engine.py (`torchrun --nproc_per_node=1 tests/zero_lone.py
STAGE:PRECISION ...`).

Each layout trains a tiny model a few clipped steps twice from the same weights: once as the
engine is built (the reduction left out) and once with DeepSpeed's reduction put back. Prints
one JSON line per layout: whether the skip was installed and whether every weight of the two
runs is bit for bit the same.
"""

from __future__ import annotations

import json
import sys

import torch
from helpers import random_ids, tiny_model

from pretrain.config import Config, EngineConfig, OptimConfig
from pretrain.engine import runtime

STEPS = 3
OPTIM = OptimConfig(lr=0.01, decay="constant", warmup_steps=0, grad_clip=0.02)


def train(stage: int, precision: str, world, reduce: bool) -> tuple[bool, list, bool]:
    """(skip installed, the weights after training, whether training changed them)"""
    model = tiny_model("albert", seed=0).train()
    start = [p.detach().float().clone() for p in model.parameters()]
    engine_cfg = EngineConfig(zero_stage=stage, precision=precision, micro_batch_size=2)
    engine = runtime.initialize(model, Config(optim=OPTIM, engine=engine_cfg), world)
    installed = "buffered_reduce_fallback" in vars(engine.optimizer)
    if reduce and installed:
        del engine.optimizer.buffered_reduce_fallback  # DeepSpeed's own method again
    for t in range(1, STEPS + 1):
        ids = random_ids(batch=2, length=12, seed=t).to(world.device)
        engine.backward(engine(ids).logits.float().square().mean())
        engine.step()
    weights = [p.detach().float().clone() for p in model.parameters()]
    moved = not all(torch.equal(a, b) for a, b in zip(start, weights, strict=True))
    engine.destroy()
    return installed, weights, moved


def main(layouts: list[str]) -> None:
    world = runtime.init_distributed()
    for layout in layouts:
        stage, precision = int(layout.split(":")[0]), layout.split(":")[1]
        installed, skipped, moved = train(stage, precision, world, reduce=False)
        _, reduced, _ = train(stage, precision, world, reduce=True)
        same = all(torch.equal(a, b) for a, b in zip(skipped, reduced, strict=True))
        print(json.dumps({"layout": layout, "installed": installed, "same": same, "moved": moved}))
    runtime.teardown(None)


if __name__ == "__main__":
    main(sys.argv[1:])
