"""Our ZeRO-1/2 path (pretrain/engine/fused.py: one_pass_step everywhere, skip_lone_reduction
on one rank; pretrain/engine/ds_config.py: a bucket the size of the gradients and, on a CPU,
no contiguous gradients) against DeepSpeed's own; run by tests/test_engine.py
(`torchrun --nproc_per_node=N tests/zero_paths.py STAGE:PRECISION ...`).

Each layout trains a tiny model from the same weights twice: as the engine is built, and
with DeepSpeed's own step and reduction and its default bucket and contiguous gradients
(the fused norm stays in both: it is held against DeepSpeed's by tests/zero_norm.py). A
few clipped steps, then one whose loss is inf on rank 0 and NaN elsewhere (skipped), then
one more. Prints one JSON line per layout: which shortcuts were installed, whether training
moved the weights, whether the non-finite step was skipped by both, and whether the weights
and the fp32 master partitions of the two runs are bit for bit the same.
"""

from __future__ import annotations

import json
import sys

import torch
from helpers import random_ids, tiny_model

from pretrain.config import Config, EngineConfig, OptimConfig
from pretrain.engine import runtime

OPTIM = OptimConfig(lr=0.01, decay="constant", warmup_steps=0, grad_clip=0.02)
SHORTCUTS = ("step", "buffered_reduce_fallback")
OUR_ZERO_KEYS = ("reduce_bucket_size", "contiguous_gradients")
OUR_CONFIG = runtime.build_ds_config


def deepspeeds_config(*args, **kwargs) -> dict:
    """Our DeepSpeed config without the ZeRO keys we set for speed: DeepSpeed's defaults."""
    ds = OUR_CONFIG(*args, **kwargs)
    for key in OUR_ZERO_KEYS:
        ds["zero_optimization"].pop(key, None)
    return ds


NONFINITE = 4  # the step whose loss is not finite


def train(stage: int, precision: str, world, ours: bool) -> dict:
    model = tiny_model("albert", seed=0).train()
    start = [p.detach().float().clone() for p in model.parameters()]
    engine_cfg = EngineConfig(zero_stage=stage, precision=precision, micro_batch_size=2)
    runtime.build_ds_config = OUR_CONFIG if ours else deepspeeds_config
    engine = runtime.initialize(model, Config(optim=OPTIM, engine=engine_cfg), world)
    optimizer = engine.optimizer
    installed = {name: name in vars(optimizer) for name in SHORTCUTS}
    installed["contiguous_gradients"] = optimizer.contiguous_gradients
    if not ours:
        for name in SHORTCUTS:
            vars(optimizer).pop(name, None)  # DeepSpeed's own method again
    skipped = []
    for t in range(1, NONFINITE + 2):
        ids = random_ids(batch=2, length=12, seed=100 * world.rank + t).to(world.device)
        loss = engine(ids).logits.float().square().mean()
        if t == NONFINITE:
            loss = loss * (float("inf") if world.rank == 0 else float("nan"))
        engine.backward(loss)
        engine.step()
        skipped.append(bool(optimizer.overflow))
    weights = [p.detach().float().clone() for p in model.parameters()]
    master = [t.detach().clone() for t in optimizer.single_partition_of_fp32_groups]
    engine.destroy()
    moved = not all(torch.equal(a, b) for a, b in zip(start, weights, strict=True))
    return {
        "installed": installed,
        "weights": weights,
        "master": master,
        "moved": moved,
        "skipped": skipped,
    }


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def main(layouts: list[str]) -> None:
    world = runtime.init_distributed()
    for layout in layouts:
        stage, precision = int(layout.split(":")[0]), layout.split(":")[1]
        ours = train(stage, precision, world, ours=True)
        theirs = train(stage, precision, world, ours=False)
        row = {
            "layout": layout,
            "ranks": world.size,
            "installed": ours["installed"],
            "moved": ours["moved"],
            "skipped": [ours["skipped"], theirs["skipped"]],
            "same_weights": same(ours["weights"], theirs["weights"]),
            "same_master": same(ours["master"], theirs["master"]),
        }
        if world.rank == 0:
            print(json.dumps(row), flush=True)
    runtime.teardown(None)


if __name__ == "__main__":
    main(sys.argv[1:])
