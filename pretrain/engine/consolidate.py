"""fp32 weights from a DeepSpeed checkpoint of any ZeRO stage and rank count, loaded
without unpickling arbitrary objects.

DeepSpeed's own zero_to_fp32 does the consolidation; every `torch.load` it makes goes
through `checkpoint.safe_load` (`weights_only=True` and an allowlist of the few plain data
classes DeepSpeed puts into its optimizer files, by `checkpoint.weights_only_loads`), so a
checkpoint folder cannot execute code when it is read. Reading a checkpoint for export
(its config and tokenizer, checked against the weights) is export/checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.utils import zero_to_fp32

from pretrain.engine.checkpoint import weights_only_loads


def fp32_state_dict(checkpoint_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's fp32 state dict from checkpoint `tag` in `checkpoint_dir`."""
    directory = Path(checkpoint_dir)
    with weights_only_loads():
        if not any((directory / tag).glob("*optim_states.pt")):  # ZeRO-0 keeps whole weights
            states = torch.load(directory / tag / "mp_rank_00_model_states.pt", map_location="cpu")
            return {k: v.float() for k, v in states["module"].items()}
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    return {k: v.float().contiguous() for k, v in state.items()}
