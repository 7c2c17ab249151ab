"""Process group, DeepSpeed engine, and the few collectives the trainer needs."""

from __future__ import annotations

import gc
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import set_z3_leaf_modules_by_name
from torch import nn

from pretrain import hardware
from pretrain.config import Config, ConfigError
from pretrain.engine.ds_config import build_ds_config
from pretrain.engine.fused import fuse_grad_norm, one_pass_step, skip_lone_reduction
from pretrain.engine.optim import Lamb, build_optimizer, build_scheduler
from pretrain.engine.partitions import zero_partitions


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory op at every start, under a lock file in
    ~/.cache/torch_extensions. Training never calls it (only `inference_all_reduce` does), and a
    rank killed while holding that lock leaves it behind, after which every later start waits
    on it forever. Marking the op incompatible skips the build; gradients go through gloo."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> World:
    """Join the process group set up by the deepspeed launcher, torchrun or SLURM; a plain
    `python` start becomes a world of one."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        # One task per rank under srun: SLURM numbers them (MASTER_ADDR/PORT come from the
        # batch script, launch/pretrain.sbatch).
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
        )
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        skip_shm_comm_build()
    deepspeed.init_distributed(verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return World(dist.get_rank(), local_rank, dist.get_world_size(), device)


def resolve_precision(requested: str, world: World) -> hardware.PrecisionChoice:
    """`engine.precision` as this run will run it (auto resolved): rank 0 decides, timing
    matmuls while the others wait, and every rank gets its choice."""
    choice = hardware.choose_precision(requested, world.device) if world.rank == 0 else None
    return broadcast_object(choice)


def measured_peak(precision: str, world: World) -> hardware.Peak:
    """The matmul peak of `precision` for MFU: measured (or read from the host's cache) by
    rank 0 alone, so no other rank competes for the cores while it is timed."""
    peak = hardware.cached_peak(world.device, precision) if world.rank == 0 else None
    return broadcast_object(peak)


class PrecisionError(ConfigError):
    """A precision the machine's accelerator cannot run (every rank has the same kind)."""

    collective = True


def check_precision(precision: str) -> None:
    """`engine.precision` runs on this machine's accelerator, or one line says what does
    (DeepSpeed would stop every rank with a traceback: fp16 on CPUs)."""
    if precision == "auto":
        raise ValueError("engine.precision=auto must be resolved first (resolve_precision)")
    accelerator = get_accelerator()
    supported = {
        "fp32": True,
        "bf16": accelerator.is_bf16_supported(),
        "fp16": accelerator.is_fp16_supported(),
    }
    if not supported[precision]:
        usable = " or ".join(p for p, ok in supported.items() if ok)
        raise PrecisionError(
            f"engine.precision={precision} is not supported on this machine's"
            f" {accelerator.device_name()} accelerator; use engine.precision={usable}"
        )


def gather_shared_encoder_whole(model: nn.Module, cfg: Config) -> None:
    """Under ZeRO-3, an encoder that reuses a parameter set is one unit to DeepSpeed (a leaf
    module): its sets are all-gathered once when its forward starts and once when its
    backward does, from the first step on. Otherwise, until DeepSpeed has traced a step, it
    releases a set after each layer application and gathers it again for the next; after
    the trace its reuse window (ds_config.ZERO3_REUSE) keeps a set through the step, with
    or without this. An encoder whose sets each run once keeps DeepSpeed's per-layer
    order."""
    encoder = getattr(model, "encoder", None)
    if cfg.engine.zero_stage == 3 and encoder is not None and encoder.plan.reuses:
        set_z3_leaf_modules_by_name(model, ["encoder"])


def initialize(model: nn.Module, cfg: Config, world: World):
    """Wrap `model` in a DeepSpeed engine with our optimizer and LR schedule."""
    check_precision(cfg.engine.precision)
    gather_shared_encoder_whole(model, cfg)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=build_ds_config(
            cfg.engine,
            cfg.optim,
            world.size,
            gradient_elements=sum(p.numel() for p in model.parameters() if p.requires_grad),
            cpu=world.device.type == "cpu",
        ),
    )
    fuse_grad_norm(engine.optimizer)
    skip_lone_reduction(engine.optimizer)
    one_pass_step(engine.optimizer)
    # Without ZeRO in fp32 the engine steps our optimizer over the model's own tensors.
    if isinstance(optimizer, Lamb) and engine.optimizer is not optimizer:
        optimizer.partitions = zero_partitions(engine.optimizer)
    return engine


def replan_schedule(engine, step: int, lr: float) -> float:
    """After resuming with new schedule settings: the LR scheduler's factor was rebuilt from
    this run's config, but its base LR and the optimizer's current LR came from the
    checkpoint. Put the new `lr` and the new schedule's value at `step` in their place.
    Returns the LR of the next update."""
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [lr] * len(groups)
    for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in groups]
    return scheduler._last_lr[0]


def mean_across_ranks(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of numbers over all ranks (one all-reduce)."""
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (small picklable values between our own ranks)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def weights_finite(module: nn.Module, device: torch.device) -> bool:
    """Whether every weight on every rank is finite: the largest magnitude of each tensor
    this rank holds (under ZeRO-3, its partition), then one vote."""
    local = [getattr(p, "ds_tensor", p).detach() for p in module.parameters()]
    local = [t for t in local if t.numel()]
    finite = not local or bool(
        torch.isfinite(torch.stack(torch._foreach_norm(local, math.inf))).all()
    )
    return not any_rank(not finite, device)


def current_loss_scale(engine) -> float | None:
    """The dynamic fp16 loss scale now in use (None when the optimizer has none)."""
    scale = getattr(engine.optimizer, "loss_scale", None)
    return float(scale) if isinstance(scale, (int, float)) else None


def barrier() -> None:
    dist.barrier()


def comm_bytes() -> dict[str, int]:
    """Bytes moved per collective kind since the comms logger started (comms_logger on)."""
    from deepspeed.comm import comm

    raw = comm.comms_logger.get_raw_data()
    return {op: sum(size * v[0] for size, v in sizes.items()) for op, sizes in raw.items()}


def log_comm_summary() -> None:
    deepspeed.comm.log_summary()


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def lost_a_peer(err: BaseException) -> bool:
    """The error a rank gets in a collective when another rank has ended."""
    text = str(err)
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError)
        and any(m in text for m in ("Connection closed by peer", "Connection reset by peer"))
    )


def teardown(engine) -> None:
    """Explicit shutdown: without it about 1 run in 5 aborts at exit when a gloo thread
    outlives Python (DeepSpeed 0.19.8 on CPU); destroy_process_group alone is not enough."""
    if engine is not None:
        engine.destroy()
    del engine
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
