"""Weights files that are pickles: loaded as tensors and plain data only, and anything else
in one is one line naming the file and what it asks for (nothing of it runs)."""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import UserError

_torch_load = torch.load  # the real one, also while the exporter patches torch.load

# For a user's Hugging Face folder: the format that holds tensors and nothing else.
TO_SAFETENSORS = (
    "convert it to safetensors (model.safetensors) from a copy you trust, or use a folder"
    " that has one"
)


def refusal(
    path: str | Path, err: pickle.UnpicklingError, hostile: str, corrupt: str | None = None
) -> UserError:
    """The one line for a file that a weights-only load refused, naming what it holds; the
    fix `hostile` for objects other than data, `corrupt` (default: the same) for a file that
    is no torch file at all."""
    named = re.search(r"GLOBAL ([\w.]+)", str(err))
    if named is None:
        return UserError(
            f"cannot read {path}: it is not a file torch.save wrote (corrupt or replaced);"
            f" {corrupt or hostile}"
        )
    return UserError(
        f"refusing to load {path}: it holds objects other than tensors and plain data"
        f" (it names {named.group(1)}); {hostile}"
    )


def load_tensors(
    path: str | Path,
    map_location=None,
    mmap: bool | None = None,
    hostile: str = TO_SAFETENSORS,
    corrupt: str | None = None,
) -> Any:
    """torch.load of tensors and plain data only (`weights_only=True`, plus whatever
    `torch.serialization.safe_globals` allows around the call); anything else in the file,
    or a file torch cannot read, is one clear error (`refusal`'s fixes)."""
    try:
        return _torch_load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        raise refusal(path, err, hostile, corrupt) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


@contextlib.contextmanager
def refusing_pickles(folder: str | Path, fix: str = TO_SAFETENSORS) -> Iterator[None]:
    """Around a library's own load of `folder` (transformers' from_pretrained loads
    pytorch_model.bin weights-only): its refusal becomes our one line, naming the file."""
    try:
        yield
    except pickle.UnpicklingError as err:
        files = sorted(Path(folder).glob("*.bin")) or [Path(folder)]
        raise refusal(", ".join(map(str, files)), err, fix) from None
