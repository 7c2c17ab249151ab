"""fp32 weights from a DeepSpeed checkpoint of any ZeRO stage and rank count, loaded
without unpickling arbitrary objects.

DeepSpeed's own zero_to_fp32 does the consolidation; every `torch.load` it makes goes
through `weights.safe_load` (`weights_only=True` and an allowlist of the few plain data
classes DeepSpeed puts into its optimizer files, by `universal.weights_only_loads`), so a
checkpoint folder cannot execute code when it is read. Reading a checkpoint for export
(its config and tokenizer, checked against the weights) is export/checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.utils import zero_to_fp32

from pretrain.engine.universal import weights_only_loads
from pretrain.engine.weights import safe_load


def fp32_state_dict(checkpoint_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's fp32 state dict from checkpoint `tag` in `checkpoint_dir`."""
    directory = Path(checkpoint_dir)
    with weights_only_loads():
        if not any((directory / tag).glob("*optim_states.pt")):  # ZeRO-0 keeps whole weights
            states = torch.load(directory / tag / "mp_rank_00_model_states.pt", map_location="cpu")
            return {k: v.float() for k, v in states["module"].items()}
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    return {k: v.float().contiguous() for k, v in state.items()}


def stage_fp32_state_dict(tag_dir: Path, stage: int) -> dict[str, torch.Tensor]:
    """One pipeline stage's fp32 master weights, under the pipeline module's names, from
    its ZeRO-1 (or bf16/fp16) optimizer files in checkpoint folder `tag_dir`: DeepSpeed's
    own consolidation, run on that stage's files (its public entry point reads stage 0)."""
    model_file = tag_dir / f"mp_rank_{stage:02d}_model_states.pt"
    optim_files = sorted(
        tag_dir.glob(f"*zero_pp_rank_*_mp_rank_{stage:02d}_optim_states.pt"),
        key=lambda f: int(f.name.split("zero_pp_rank_")[1].split("_")[0]),
    )
    states = safe_load(model_file)
    # The stage's module state is in its layer files, not here (None): the buffers the
    # consolidation would take from it are none of ours (RoPE tables and the ACT signal
    # are not persistent).
    models = [
        zero_to_fp32.zero_model_state(
            buffers={},
            param_shapes=states["param_shapes"],
            shared_params=list(states["shared_params"].items()),
            ds_version=states.get("ds_version"),
            frozen_param_shapes=states.get("frozen_param_shapes"),
            frozen_param_fragments=states.get("frozen_param_fragments"),
        )
    ]
    with weights_only_loads():
        _, replicas, flat_groups, paddings = zero_to_fp32.parse_optim_states(
            [str(f) for f in optim_files], str(tag_dir)
        )
        state = zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(
            replicas, flat_groups, models, False, paddings
        )
    return {k: v.float().contiguous() for k, v in state.items()}
