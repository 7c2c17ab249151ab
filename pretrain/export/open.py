"""One reader of what is on disk: what a model folder is, and the model in it.

    found = what_is(path)          # kind and config only: no weights are read
    opened = read(found)           # the weights too; opened.build() is the model, eval mode
    opened = open_model(path, accepts=("run", "native"), command="...")  # both, if it is one

Every command that takes a model folder (report, compress, convert, the distillation
teacher, fine-tuning) asks here, so that each kind is recognised the same way and a folder
that is none of them gets the same one-line answer. The kinds:

- run: a run directory or its checkpoints/ folder; read at its newest checkpoint that
  verifies (each newer one skipped is named), or at `tag`;
- checkpoint: one checkpoint's own folder (checkpoints/step00000600);
- native: our export (model.safetensors, config.json with our format);
- hf: a Hugging Face model folder (config.json with model_type) of a family we convert;
- int8: our int8 export (pretrain.export.compressed).

A training checkpoint is consolidated to fp32 (any ZeRO stage, rank count or pipeline
layout) and its tokenizer found and checked by checksum (pretrain.export.checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.config import Config, ModelConfig, from_dict
from pretrain.data.tokenizer import MODEL_FILE
from pretrain.engine.manifest import RUN_STATE, check_tag, read_run_state
from pretrain.errors import UserError
from pretrain.export import compressed, native
from pretrain.export.checkpoint import (
    checkpoint_folder,
    newest_valid_tag,
    read_checkpoint,
    read_native,
)
from pretrain.export.hf import CONFIG_FILE, format_for_model_type, load_hf
from pretrain.model import SharedTransformer

KINDS = {
    "run": "a run directory or its checkpoints/ folder",
    "checkpoint": "a checkpoint's own folder (checkpoints/stepNNNNNNNN)",
    "native": "a native export (model.safetensors and config.json)",
    "hf": "a Hugging Face model folder (config.json with model_type)",
    "int8": "an int8 export",
}
EXPECTED = ", ".join(list(KINDS.values())[:-1]) + " or " + KINDS["int8"]


@dataclass
class Found:
    """What a model folder is, from its configs alone."""

    kind: str
    path: Path
    cfg: ModelConfig
    """For an HF folder, without a pretraining pair head (ALBERT's SOP): only its weights
    say whether it has one, and no teacher uses it."""
    where: str
    """The path error messages name: for a run, its checkpoint's folder."""
    checkpoints: Path | None = None
    """The checkpoints/ folder of a run or checkpoint."""
    tag: str | None = None
    """The checkpoint a run or checkpoint is read at."""
    meta: dict | None = None
    """A folder's config.json (native, hf, int8)."""
    run_state: dict | None = None
    """The run state of a training checkpoint (step, samples, the run's config, its
    tokenizer's checksum); None for an export."""


@dataclass
class Opened:
    """A model folder with its weights: our state dict (None for int8, whose quantized
    weights only the model holds), config and tokenizer folder."""

    found: Found
    state: dict[str, torch.Tensor] | None
    cfg: ModelConfig
    """The model config of the weights (an HF folder's with its pair head, if it has one)."""
    tokenizer_dir: Path | None
    """Our SentencePiece tokenizer folder, where the folder has or names one."""

    @property
    def kind(self) -> str:
        return self.found.kind

    @property
    def where(self) -> str:
        return self.found.where

    @property
    def run_config(self) -> Config | None:
        """The config the checkpoint's run trained with; None for an export."""
        state = self.found.run_state
        return None if state is None else from_dict(Config, state["config"])

    def build(self) -> SharedTransformer:
        """A new model holding the weights, in eval mode on CPU."""
        if self.state is None:
            return compressed.load_int8(self.found.path)
        return native.build_model(self.state, self.cfg, self.where)


def _json(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{file} is not JSON; expected {EXPECTED}") from None
    return meta if isinstance(meta, dict) else None


def _checkpoint(kind: str, path: Path, folder: Path, tag: str) -> Found:
    state = read_run_state(folder, tag)
    cfg = from_dict(ModelConfig, state["config"]["model"], "model")
    return Found(kind, path, cfg, str(folder / tag), checkpoints=folder, tag=tag, run_state=state)


def kind_of(path: str | Path) -> str:
    """Which of KINDS the folder at `path` is, from file names and config.json alone (an HF
    folder of any model_type); one line naming what is expected when it is none."""
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise UserError(f"{path} {what}; expected {EXPECTED}")
    meta = _json(path / CONFIG_FILE) or {}
    if meta.get("format") == compressed.INT8_FORMAT:
        return "int8"
    if meta.get("format") == native.FORMAT:
        return "native"
    if "model_type" in meta:
        return "hf"
    if (path / RUN_STATE).is_file():
        return "checkpoint"
    try:
        checkpoint_folder(path)
    except UserError:
        raise UserError(f"{path} holds no model; expected {EXPECTED}") from None
    return "run"


def what_is(path: str | Path, tag: str | None = None) -> Found:
    """The kind and model config of the folder at `path` (`kind_of`). `tag`: the checkpoint
    of a run to read (default: its newest that verifies)."""
    path = Path(path)
    kind = kind_of(path)
    if tag is not None and kind != "run":
        raise UserError(f"{path} is {KINDS[kind]}; only a run directory takes a tag")
    if kind == "checkpoint":
        check_tag(path.parent, path.name)
        return _checkpoint(kind, path, path.parent, path.name)
    if kind == "run":
        folder = checkpoint_folder(path)
        if tag is None:
            tag = newest_valid_tag(folder)
        else:
            check_tag(folder, tag)
        return _checkpoint(kind, path, folder, tag)
    meta = _json(path / CONFIG_FILE)
    if kind == "int8":
        return Found(kind, path, from_dict(ModelConfig, meta["model"], "model"), str(path))
    if kind == "native":
        return Found(kind, path, native.load_config(path), str(path), meta=meta)
    fmt = format_for_model_type(meta["model_type"])
    pair = {} if fmt.pair_head is None else {"sop_head": False}
    return Found(kind, path, fmt.adapter.config_from_hf(meta, **pair), str(path), meta=meta)


def refuse(found: Found, accepts: tuple[str, ...], command: str) -> None:
    """One line when `command` does not take what `found` is, naming what it takes."""
    if found.kind not in accepts:
        takes = " or ".join(KINDS[k] for k in accepts)
        raise UserError(f"{found.path} is {KINDS[found.kind]}; {command} takes {takes}")


def open_model(
    path: str | Path,
    tag: str | None = None,
    tokenizer: str | Path | None = None,
    accepts: tuple[str, ...] = tuple(KINDS),
    command: str = "this command",
    need_tokenizer: bool = True,
) -> Opened:
    """The model folder at `path` with its weights, if it is one of `accepts` (else one
    line saying what `command` takes). `tokenizer`: the training tokenizer, for a checkpoint
    whose run no longer finds it, or instead of a native export's own. `need_tokenizer`: a
    checkpoint whose tokenizer is not found is an error (else it has tokenizer_dir None)."""
    found = what_is(path, tag)
    refuse(found, accepts, command)
    return read(found, tokenizer, need_tokenizer)


def read(found: Found, tokenizer: str | Path | None = None, need_tokenizer: bool = True) -> Opened:
    """The weights of what `what_is` found (`open_model` says what the arguments do)."""
    if found.kind == "int8":
        return Opened(found, None, found.cfg, _own_tokenizer(found.path))
    if found.kind == "native":
        trained = read_native(found.path, tokenizer)
    elif found.kind == "hf":
        state, cfg, _ = load_hf(found.path)
        return Opened(found, state, cfg, None)
    else:
        trained = read_checkpoint(found.checkpoints, found.tag, tokenizer, need_tokenizer)
    return Opened(found, trained.state, trained.cfg, trained.tokenizer_dir)


def _own_tokenizer(path: Path) -> Path | None:
    folder = path / native.TOKENIZER
    return folder if (folder / MODEL_FILE).is_file() else None
