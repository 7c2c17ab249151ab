"""One gradient norm a step, and no reduction within one rank, for DeepSpeed's ZeRO-1/2
optimizer.

DeepSpeed 0.19.8 computes the norm that clipping needs with one Python-level norm, one copy
to fp64 and one all-reduce per tensor group, and under bf16 and fp16 first scans every
gradient again for inf/NaN with an all-reduce of its own. On a small model that is several
milliseconds a step of Python and collectives (on a CPU, more than the optimizer's update).
Here the norm of every group is one fused norm and one all-reduce, and the scan is left out
where the norm already decides: a gradient holding inf or NaN has a non-finite norm, which
DeepSpeed's step treats as an overflow (skipped step, loss scale backed off) as the scan would.
The norm stays in DeepSpeed's fp64: in fp32 it is a third of the time (0.13 against 0.41 ms
on the demo's gradients) and agrees to 1e-6, but the clip factor then moves in its last bits
and a bf16 run follows another trajectory (the demo ended at held-out accuracy 0.155 instead
of 0.164); in fp64 every evaluation of the demo is what it was before these changes.
"""

from __future__ import annotations

import torch
from deepspeed import comm as dist
from deepspeed.runtime.utils import all_gather_dp_groups, is_invalid_grad_norm
from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer
from deepspeed.runtime.zero.utils import get_norm_dtype


def fuse_grad_norm(optimizer) -> bool:
    """Install the fused norm on a ZeRO-1/2 optimizer (in place); False where DeepSpeed's own
    path must stay: other optimizers, offload, tensor or expert parallelism, Muon."""
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not _plain(optimizer):
        return False
    optimizer.scaled_global_norm = lambda norm_type=2: _global_norm(optimizer, norm_type)
    if optimizer.compute_grad_norm and optimizer.check_grad_overflow:
        # The step reads `overflow` from the norm when check_grad_overflow is on.
        optimizer.check_overflow = lambda partition_gradients=True: None
    return True


def skip_lone_reduction(optimizer) -> bool:
    """In a data-parallel group of one rank the reduced gradients are the rank's own: DeepSpeed
    would still flatten them, divide them by 1, all-reduce the copy with itself and copy it
    back, at every micro-step. Left out there (in place); False where the reduction stays:
    more ranks, contiguous gradients (their reduction also fills the partition), sequence
    parallelism, and DeepSpeed's own path (see fuse_grad_norm)."""
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not _plain(optimizer):
        return False
    alone = dist.get_world_size(group=optimizer.dp_process_group) == 1
    if not alone or optimizer.contiguous_gradients or optimizer.sequence_parallel_size != 1:
        return False
    optimizer.buffered_reduce_fallback = lambda *args, **kwargs: None
    return True


def one_pass_step(optimizer) -> bool:
    """DeepSpeed's ZeRO-1/2 step, in place, as one pass over the parameter groups: the same
    updates bit for bit (tests/zero_paths.py) for less of its Python. DeepSpeed runs the
    optimizer once per group (weights with and without decay), clipping each group's
    gradients with the same factor, and then points every parameter at the flat buffer it
    already points at. Here the groups are clipped and stepped together, and a parameter is
    pointed again only where something moved it. A step with a non-finite norm is skipped
    and backs the loss scale off, as DeepSpeed's. False where DeepSpeed's own step
    stays: see fuse_grad_norm, and autocast's grad scaler, no norm, gradient accumulation
    in a separate attribute."""
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not _plain(optimizer):
        return False
    norm_decides = "check_overflow" in vars(optimizer) or not optimizer.check_grad_overflow
    if (
        optimizer.torch_autocast_gradscaler is not None
        or not optimizer.compute_grad_norm
        or not norm_decides  # fuse_grad_norm first: the norm must be what detects overflow
        or optimizer.use_grad_accum_attribute
    ):
        return False
    optimizer.step = lambda closure=None: _step(optimizer)
    return True


def _step(optimizer) -> None:
    o = optimizer
    o.micro_step_id = INITIAL_MICRO_STEP_ID
    norm = o.scaled_global_norm()
    # DeepSpeed's own test of the norm (bf16 without the overflow check steps on).
    o.overflow = (o.dtype != torch.bfloat16 or o.check_grad_overflow) and bool(
        is_invalid_grad_norm(norm)
    )
    prev_scale = o.loss_scale
    o._update_scale(o.overflow)
    if o.overflow:  # skipped, as DeepSpeed skips it
        o._global_grad_norm = float("inf")
        o.zero_grad(set_to_none=True)
        o._release_preflattened_grad_buffers()
        for i in o.averaged_gradients:
            o.averaged_gradients[i] = None
            o.all_grad_tensors[i] = None
        return
    o._commit_muon_momentum()
    o._global_grad_norm = norm / prev_scale
    grads = [_fp32_grad_partition(o, i) for i in range(len(o.bit16_groups))]
    o.unscale_and_clip_grads(grads, norm)
    o.optimizer.step()
    o._lazy_init_hp_params_optimizer_state()
    for i, fp32_partition in enumerate(o.single_partition_of_fp32_groups):
        fp32_partition.grad = None
        rank = dist.get_rank(group=o.real_dp_process_group[i])
        o.parallel_partitioned_bit16_groups[i][rank].data.copy_(fp32_partition.data)
    all_gather_dp_groups(
        groups_flat=o.bit16_groups_flat,
        partitioned_param_groups=o.parallel_partitioned_bit16_groups,
        dp_process_group=o.real_dp_process_group,
        start_alignment_factor=o.nccl_start_alignment_factor,
        allgather_bucket_size=o.allgather_bucket_size,
    )
    for i in range(len(o.bit16_groups)):
        if not _points_into_flat(o, i):
            o._update_model_bit16_weights(i)


def _fp32_grad_partition(o, i: int) -> torch.Tensor:
    """Group i's reduced gradients, this rank's partition, as one flat fp32 tensor set as
    the grad of its fp32 weights; the gradients they came from released (as DeepSpeed)."""
    o.free_grad_in_param_list(o.params_not_in_partition[i])
    flat = o._get_preflattened_grad_partition(i)
    if flat is None:
        group, size = o.real_dp_process_group[i], int(o.partition_size[i])
        if dist.get_rank(group=group) == dist.get_world_size(group=group) - 1:
            flat = o.flatten_dense_tensors_aligned(o.averaged_gradients[i], size)
        else:
            flat = o.flatten(o.averaged_gradients[i])
    grad = flat.to(o.single_partition_of_fp32_groups[i].dtype)
    if grad.numel() != o.partition_size[i]:
        raise RuntimeError(
            f"ZeRO group {i}: {grad.numel()} gradient elements for a partition of"
            f" {o.partition_size[i]}"
        )
    o.single_partition_of_fp32_groups[i].grad = grad
    o.free_grad_in_param_list(o.params_in_partition[i])
    o._release_preflattened_grad_buffers(i)
    o.averaged_gradients[i] = None
    o.all_grad_tensors[i] = None
    return grad


def _points_into_flat(o, i: int) -> bool:
    """Whether every parameter of group i is still the view of the group's flat buffer that
    DeepSpeed made it (the all-gather writes there)."""
    flat = o.bit16_groups_flat[i]
    base, size = flat.data_ptr(), flat.element_size()
    pieces = zip(o.round_robin_bit16_groups[i], o.round_robin_bit16_offsets[i], strict=True)
    return all(p.data_ptr() == base + offset * size for p, offset in pieces)


def _plain(optimizer) -> bool:
    return not (
        optimizer.cpu_offload
        or optimizer.mpu is not None
        or optimizer.has_moe_layers
        or getattr(optimizer, "groups_lacking_loss_scale", None)
        or getattr(optimizer, "zenflow", False)
    )


def _is_padding(grad: torch.Tensor) -> bool:
    return getattr(grad, "_zero_padding", False)


def _global_norm(optimizer, norm_type: float) -> torch.Tensor:
    """The L2 norm of this step's (loss-scaled) gradients over every rank: inf when any is
    not finite, as DeepSpeed's own combination reports it."""
    if float(norm_type) != 2.0:
        return DeepSpeedZeroOptimizer.scaled_global_norm(optimizer, norm_type)
    grads = []
    for i in range(len(optimizer.bit16_groups)):
        kept = (g for g in optimizer.averaged_gradients[i] if not _is_padding(g))
        # DeepSpeed pairs them the same way: a partition's gradients, then its parameters.
        for g, p in zip(kept, optimizer.params_in_partition[i], strict=False):
            if not getattr(p, "ds_pipe_replicated", False):  # a pipeline's copy counts once
                grads.append(g.detach())
    dtype = get_norm_dtype()
    if grads:
        sum_sq = torch.stack(torch._foreach_norm(grads, 2.0, dtype=dtype)).square().sum()
    else:
        sum_sq = torch.zeros((), dtype=dtype, device=optimizer.device)
    sum_sq = sum_sq.float()
    if dist.get_world_size(group=optimizer.dp_process_group) > 1:  # one rank: its own sum
        dist.all_reduce(sum_sq, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
    norm = sum_sq.sqrt()
    return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, float("inf")))
