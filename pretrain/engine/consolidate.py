"""fp32 weights from a DeepSpeed checkpoint of any ZeRO stage and rank count, loaded
without unpickling arbitrary objects.

DeepSpeed's own zero_to_fp32 does the consolidation; every `torch.load` it makes goes
through `checkpoint.safe_load` (`weights_only=True` and an allowlist of the few plain data
classes DeepSpeed puts into its optimizer files), so a checkpoint folder cannot execute
code when it is read.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from deepspeed.utils import zero_to_fp32

from pretrain.config import ModelConfig, from_dict
from pretrain.data.tokenizer import MODEL_FILE, Tokenizer
from pretrain.engine.checkpoint import (
    LATEST,
    RUN_STATE,
    check_tag,
    newest_valid,
    read_run_state,
    safe_load,
)
from pretrain.errors import UserError
from pretrain.export.native import check_state
from pretrain.model import SharedTransformer


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    def load(f, map_location=None, mmap=None, **_):  # zero_to_fp32 asks weights_only=False
        return safe_load(f, map_location, mmap)

    with mock.patch.object(torch, "load", load):
        yield


def fp32_state_dict(checkpoint_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's fp32 state dict from checkpoint `tag` in `checkpoint_dir`."""
    directory = Path(checkpoint_dir)
    with weights_only_loads():
        if not any((directory / tag).glob("*optim_states.pt")):  # ZeRO-0 keeps whole weights
            states = torch.load(directory / tag / "mp_rank_00_model_states.pt", map_location="cpu")
            return {k: v.float() for k, v in states["module"].items()}
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    return {k: v.float().contiguous() for k, v in state.items()}


@dataclass
class TrainedModel:
    """What a training checkpoint holds for export."""

    state: dict[str, torch.Tensor]
    cfg: ModelConfig
    tokenizer_dir: Path
    where: str


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoints/ folder of a run directory, or the folder itself."""
    path = Path(path)
    for candidate in (path / "checkpoints", path):
        if (candidate / LATEST).is_file() or any(candidate.glob("step*/" + RUN_STATE)):
            return candidate
    raise UserError(
        f"{path} is not a checkpoint folder: expected a run directory with checkpoints/ or"
        " a checkpoints folder holding step*/ and latest"
    )


def _tokenizer_for(run_state: dict, override: str | Path | None, where: str) -> Path:
    data = run_state["config"]["data"]
    candidates = [override] if override else [data["tokenizer"], Path(data["path"]) / "tokenizer"]
    for candidate in candidates:
        if candidate and (Path(candidate) / MODEL_FILE).is_file():
            found = Path(candidate)
            if Tokenizer(found).info.checksum != run_state["tokenizer_checksum"]:
                raise UserError(
                    f"the tokenizer in {found} is not the one {where} was trained with"
                    " (checksum differs); pass the original with --tokenizer DIR"
                )
            return found
    raise UserError(
        f"missing tokenizer for {where}: none at {', '.join(map(str, filter(None, candidates)))};"
        " pass the training tokenizer with --tokenizer DIR"
    )


def newest_valid_tag(folder: Path) -> str:
    """The newest checkpoint in `folder` that verifies; each newer one skipped is named."""
    tag, skipped = newest_valid(folder)
    for bad, problem in skipped:
        print(f"warning: skipping checkpoint {folder / bad}: {problem}", file=sys.stderr)
    if tag is None:
        why = "each one was skipped above" if skipped else "it holds none"
        raise UserError(f"no checkpoint in {folder} verifies: {why}")
    return tag


def read_checkpoint(
    path: str | Path, tag: str | None = None, tokenizer: str | Path | None = None
) -> TrainedModel:
    """Consolidated fp32 weights, model config and tokenizer of a training checkpoint."""
    folder = checkpoint_folder(path)
    if tag is None:
        tag = newest_valid_tag(folder)
    else:
        check_tag(folder, tag)
    where = str(folder / tag)
    run_state = read_run_state(folder, tag)
    cfg = from_dict(ModelConfig, run_state["config"]["model"], "model")
    tokenizer_dir = _tokenizer_for(run_state, tokenizer, where)
    state = fp32_state_dict(folder, tag)
    check_state(state, SharedTransformer(cfg), where)
    return TrainedModel(state, cfg, tokenizer_dir, where)
