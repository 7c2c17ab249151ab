"""One gradient norm a step, and no reduction within one rank, for DeepSpeed's ZeRO-1/2
optimizer.

DeepSpeed 0.19.8 computes the norm that clipping needs with one Python-level norm, one copy
to fp64 and one all-reduce per tensor group, and under bf16 and fp16 first scans every
gradient again for inf/NaN with an all-reduce of its own. On a small model that is several
milliseconds a step of Python and collectives (on a CPU, more than the optimizer's update).
Here the norm of every group is one fused norm and one all-reduce, and the scan is left out
where the norm already decides: a gradient holding inf or NaN has a non-finite norm, which
DeepSpeed's step treats as an overflow (skipped step, loss scale backed off) as the scan would.
Each tensor's norm is taken in fp32 and the squares summed in fp64: DeepSpeed's
fp64 norm casts every element first, which costs three times as long for a sum that agrees
to within 1e-6 (tests/zero_norm.py).
"""

from __future__ import annotations

import torch
from deepspeed import comm as dist
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
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
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        sum_sq = torch.stack(norms).to(dtype).square().sum()
    else:
        sum_sq = torch.zeros((), dtype=dtype, device=optimizer.device)
    sum_sq = sum_sq.float()
    if dist.get_world_size(group=optimizer.dp_process_group) > 1:  # one rank: its own sum
        dist.all_reduce(sum_sq, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
    norm = sum_sq.sqrt()
    return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, float("inf")))
