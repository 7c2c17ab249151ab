"""Where each element of DeepSpeed's flat fp32 partitions comes from.

Under ZeRO 1/2/3, and with DeepSpeed's bf16 optimizer at stage 0, the torch optimizer never
sees a model tensor: each param group (ZeRO-3: each sub-group) reaches it as one flat fp32
tensor per rank, this rank's slice of the group's tensors laid end to end. An optimizer that
needs a per-tensor quantity (LAMB's trust ratio) has to map every element back to its tensor
and sum across the ranks; this module builds that map from the wrapper's own bookkeeping.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from pretrain.engine.optim import Partition


def zero_partitions(ds_optimizer) -> dict[int, Partition]:
    """id(flat fp32 tensor) -> its Partition, for every flat tensor the wrapper steps; empty
    when the wrapper steps whole fp32 copies of the tensors (fp16 without ZeRO).

    Raises TypeError for a wrapper whose layout is unknown here, rather than mis-map it.
    """
    if isinstance(ds_optimizer, DeepSpeedZeroOptimizer_Stage3):
        return _zero3(ds_optimizer)
    if isinstance(ds_optimizer, DeepSpeedZeroOptimizer):  # stages 1 and 2
        flats = ds_optimizer.single_partition_of_fp32_groups
        return _from_fragments(ds_optimizer.bit16_groups, flats, ds_optimizer.real_dp_process_group)
    if isinstance(ds_optimizer, BF16_Optimizer):  # bf16 without ZeRO still partitions
        flats = ds_optimizer.fp32_groups_flat_partition
        return _from_fragments(ds_optimizer.bf16_groups, flats, ds_optimizer.real_dp_process_group)
    if isinstance(ds_optimizer, FP16_UnfusedOptimizer):
        return {}
    raise TypeError(f"no partition layout for DeepSpeed's {type(ds_optimizer).__name__}")


def _collective_device(flat: torch.Tensor) -> torch.device:
    # Offloaded partitions live on the CPU, but NCCL reduces only accelerator tensors.
    if flat.device.type == "cpu" and torch.cuda.is_available():
        return torch.device(get_accelerator().current_device_name())
    return flat.device


def _from_fragments(param_lists, flats, groups) -> dict[int, Partition]:
    """ZeRO-1/2 and the bf16 optimizer link each model tensor to its piece of this rank's
    partition (`_hp_mapping`: start and length in the flat, None when it has no piece)."""
    out = {}
    for params, flat, group in zip(param_lists, flats, groups, strict=True):
        pieces = [
            (p._hp_mapping.hp_fragment_address.start, p._hp_mapping.hp_fragment_address.numel, i)
            for i, p in enumerate(params)
            if getattr(p, "_hp_mapping", None) is not None
        ]
        out[id(flat)] = Partition.from_pieces(
            flat.numel(), pieces, len(params), group, _collective_device(flat)
        )
    return out


def _zero3(ds_optimizer) -> dict[int, Partition]:
    """ZeRO-3 cuts every tensor into one equal piece per rank, the last one padded; a
    sub-group's flat is its tensors' pieces on this rank, in order."""
    group = ds_optimizer.dp_process_group
    rank = dist.get_rank(group=group)
    out = {}
    for params, flat in zip(
        ds_optimizer.fp16_groups, ds_optimizer.fp32_partitioned_groups_flat, strict=True
    ):
        pieces, offset = [], 0
        for index, p in enumerate(params):
            piece = p.partition_numel()
            real = min(max(p.ds_numel - rank * piece, 0), piece)  # the rest is padding
            pieces.append((offset, real, index))
            offset += piece
        out[id(flat)] = Partition.from_pieces(
            flat.numel(), pieces, len(params), group, _collective_device(flat)
        )
    return out
