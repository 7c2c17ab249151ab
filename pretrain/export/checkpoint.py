"""What a run wrote, read for export: a training checkpoint (consolidated to fp32 weights,
its model config and the tokenizer it was trained with) or a native export folder.

Importing this module does not import deepspeed: `pretrain.engine` (checkpoint tags,
manifests, fp32 consolidation) is imported where a checkpoint is read.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain.config import ModelConfig, from_dict
from pretrain.data.tokenizer import MODEL_FILE, Tokenizer
from pretrain.engine.manifest import LATEST, RUN_STATE, check_tag, newest_valid, read_run_state
from pretrain.errors import UserError
from pretrain.export.native import TOKENIZER, WEIGHTS, check_state, load_config
from pretrain.model import SharedTransformer
from pretrain.objectives.distill import PROJECTION


@dataclass
class TrainedModel:
    """What a training checkpoint holds for export."""

    state: dict[str, torch.Tensor]
    cfg: ModelConfig
    tokenizer_dir: Path | None
    where: str
    run_state: dict | None = None
    """The run state of the training checkpoint it was read from (step, consumed samples,
    the run's whole config); None for an export."""


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


def _tokenizer_for(
    run_state: dict, override: str | Path | None, where: str, need: bool = True
) -> Path | None:
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
    if not need:
        return None
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


def model_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's weights without what only training used (the distillation
    projection): the model's own state dict."""
    return {k: v for k, v in state.items() if not k.startswith(PROJECTION + ".")}


def read_checkpoint(
    path: str | Path,
    tag: str | None = None,
    tokenizer: str | Path | None = None,
    need_tokenizer: bool = True,
) -> TrainedModel:
    """Consolidated fp32 weights, model config and tokenizer of a training checkpoint
    (tokenizer_dir None where it is not found and not `need_tokenizer`)."""
    from pretrain.engine.consolidate import fp32_state_dict
    from pretrain.engine.pipeline import pipeline_state_dict

    folder = checkpoint_folder(path)
    if tag is None:
        tag = newest_valid_tag(folder)
    else:
        check_tag(folder, tag)
    where = str(folder / tag)
    run_state = read_run_state(folder, tag)
    cfg = from_dict(ModelConfig, run_state["config"]["model"], "model")
    tokenizer_dir = _tokenizer_for(run_state, tokenizer, where, need_tokenizer)
    # A pipelined run saved each stage's layers in files of their own.
    state = pipeline_state_dict(folder / tag, cfg) or fp32_state_dict(folder, tag)
    state = model_weights(state)
    check_state(state, SharedTransformer(cfg), where)
    return TrainedModel(state, cfg, tokenizer_dir, where, run_state)


def read_native(path: str | Path, tokenizer: str | Path | None = None) -> TrainedModel:
    """A native export folder, with its own tokenizer unless `tokenizer` is given."""
    path = Path(path)
    tokenizer_dir = Path(tokenizer) if tokenizer else path / TOKENIZER
    return TrainedModel(load_file(str(path / WEIGHTS)), load_config(path), tokenizer_dir, str(path))
