"""Reading DeepSpeed's checkpoint files without unpickling arbitrary objects: torch.load
with `weights_only=True` and an allowlist of the few plain classes DeepSpeed saves, and a
checkpoint engine whose every load goes through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from pretrain import pickles

SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


NOT_OURS = "it was not written by this stack"


RESTORE = "restore it, or delete its checkpoint folder to resume from an older one"


def safe_load(path: str | Path, map_location=None, mmap: bool | None = None) -> Any:
    """torch.load with `weights_only=True` and only `SAFE_GLOBALS` allowed; anything else in
    the file is one clear error, and nothing in it runs."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return pickles.load_tensors(path, map_location, mmap, hostile=NOT_OURS, corrupt=RESTORE)


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, with every load through `safe_load` (its own
    loads unpickle with weights_only=False)."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)
