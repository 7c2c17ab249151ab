"""The native export: safetensors weights, the resolved model config, the tokenizer.

model.safetensors   our state dict (shared sets stored once)
config.json         {"format": ..., "model": <ModelConfig as plain data>}
tokenizer/          the SentencePiece tokenizer folder the model was trained with
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pretrain.config import ModelConfig, from_dict, to_dict
from pretrain.errors import UserError
from pretrain.export.verify import max_logit_diff
from pretrain.model import SharedTransformer

FORMAT = "pretrain-native/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer"


def save_native(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_dir: str | Path | None,
    output: str | Path,
) -> None:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(output / WEIGHTS), {"format": FORMAT}
    )
    meta = {"format": FORMAT, "model": to_dict(cfg)}
    (output / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, output / TOKENIZER, dirs_exist_ok=True)


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise UserError(f"{directory} is not a native export ({CONFIG} missing)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return from_dict(ModelConfig, meta["model"], "model")


def build_model(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> SharedTransformer:
    """Our model of `cfg` holding `state` (checked to be exactly its tensors), in eval mode."""
    model = SharedTransformer(cfg)
    check_state(state, model, where)
    model.load_state_dict(state)
    return model.eval()


def load_model(directory: str | Path) -> SharedTransformer:
    """A native export as a model in eval mode: `model(input_ids, attention_mask=None,
    token_type_ids=None).logits` is (B, T, V)."""
    state = load_file(str(Path(directory) / WEIGHTS))
    return build_model(state, load_config(directory), str(directory))


def verify(ours: SharedTransformer, directory: str | Path) -> float:
    """Largest |logit difference| between `ours` and the native folder written from it, at
    real tokens (`verify.max_logit_diff`)."""
    return max_logit_diff(ours, load_model(directory))


def check_state(state: dict[str, torch.Tensor], model: SharedTransformer, where: str) -> None:
    """Weights must be exactly the tensors the config describes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    for key in sorted(expected.keys() | got.keys()):
        if expected.get(key) != got.get(key):
            raise UserError(
                f"the saved config of {where} disagrees with its weights: {key} is"
                f" {got.get(key, 'missing')} in the weights but {expected.get(key, 'absent')}"
                " for the config"
            )
