"""The DeepSpeed config, built from our typed config.

Every value the run relies on is written out, never left to DeepSpeed's defaults (which
change between releases: 0.19.8 clips gradients at 1.0 unless told otherwise).
"""

from __future__ import annotations

from typing import Any

from pretrain.config import EngineConfig, OptimConfig

NEVER = 1 << 30  # DeepSpeed's own periodic console prints are replaced by our logging
# ZeRO-3 keeps a gathered parameter until it has gone unused for this many module calls
# and holds up to this many gathered elements: a shared set, used by several layer
# applications in one step, is then gathered once per step, not once per use (measured
# by the comms logger: tests/test_train.py). These are DeepSpeed's defaults, stated. The
# first step, before DeepSpeed has traced one, relies on runtime.gather_shared_encoder_whole.
ZERO3_REUSE = int(1e9)
# DeepSpeed's default gradient bucket (elements). ZeRO-1/2 allocate a fresh bucket of this
# size at every micro-step: 2 GB of fp32 for any model, which on a CPU is a fresh mapping
# whose pages fault in at every step. A bucket as large as the model's gradients holds the
# same reduction (one per micro-step, the same elements) in the memory it needs.
REDUCE_BUCKET = int(5e8)


def zero_config(
    engine: EngineConfig, gradient_elements: int | None = None, cpu: bool = False
) -> dict[str, Any]:
    """`gradient_elements`: how many gradient elements one backward produces (the model's
    trainable parameters), where known; `cpu`: the ranks run on DeepSpeed's CPU accelerator."""
    # overlap_comm as DeepSpeed would choose it, stated: ZeRO-1 must not overlap when the
    # trainer owns the accumulation boundary.
    zero: dict[str, Any] = {"stage": engine.zero_stage, "overlap_comm": engine.zero_stage == 3}
    if engine.zero_stage in (1, 2) and gradient_elements:
        zero["reduce_bucket_size"] = min(REDUCE_BUCKET, gradient_elements)
    if engine.zero_stage in (1, 2) and cpu and not engine.offload_optimizer:
        # Contiguous gradients copy each gradient into the bucket as it is produced, so that
        # a GPU's caching allocator does not fragment; a CPU's allocator has no such cache, and
        # the copy costs more than it saves (bench_train --engine). The reduction is then one
        # all-reduce of the bucket instead of one reduce per owner: the same sums.
        zero["contiguous_gradients"] = False
    if engine.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = engine.zero3_persistence_threshold
        zero["stage3_max_reuse_distance"] = ZERO3_REUSE
        zero["stage3_max_live_parameters"] = ZERO3_REUSE
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return zero


def precision_config(precision: str) -> dict[str, Any]:
    return {
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
    }


def pipeline_config(engine: EngineConfig, world_size: int) -> dict[str, Any]:
    """What a pipelined run changes: the batch counts data-parallel replicas, not ranks, and
    the pipeline engine runs the micro-batches of a step itself (train_batch), so it owns
    the accumulation boundary."""
    if engine.pipeline_stages == 1:
        return {}
    replicas = world_size // engine.pipeline_stages
    return {
        "train_batch_size": engine.micro_batch_size * engine.grad_accum_steps * replicas,
        "managed_gradient_accumulation": True,
        "pipeline": {"activation_checkpoint_interval": 0, "seed_layers": False},
    }


def comms_logger_config(engine: EngineConfig) -> dict[str, Any]:
    # DeepSpeed 0.19.8 turns its comms logger on whenever the key is present, whatever
    # "enabled" says; on, it times, synchronises and records every collective (about 0.5 ms
    # of Python each on a CPU). So the key is written only to turn it on.
    if not engine.comms_logger:
        return {}
    return {"comms_logger": {"enabled": True, "prof_all": True, "verbose": False}}


def build_ds_config(
    engine: EngineConfig,
    optim: OptimConfig,
    world_size: int,
    gradient_elements: int | None = None,
    cpu: bool = False,
) -> dict[str, Any]:
    """DeepSpeed config for `world_size` ranks: data-parallel, or pipeline stages times
    data-parallel replicas (`gradient_elements`, `cpu`: see zero_config)."""
    return {
        "train_micro_batch_size_per_gpu": engine.micro_batch_size,
        "gradient_accumulation_steps": engine.grad_accum_steps,
        "train_batch_size": engine.micro_batch_size * engine.grad_accum_steps * world_size,
        # The trainer owns the accumulation boundary: backward() per micro-batch, step() once
        # per optimizer step. A micro-batch skipped for a non-finite loss then cannot shift
        # DeepSpeed's own micro-step count out of line with ours.
        "managed_gradient_accumulation": False,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero_config(engine, gradient_elements, cpu),
        **precision_config(engine.precision),
        # Our optimizers (torch AdamW, our LAMB) are plain torch optimizers.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
        **comms_logger_config(engine),
        **pipeline_config(engine, world_size),
    }
