"""Checkpoints: DeepSpeed's own format plus our client state, saved crash-safely.

Layout under <output_dir>/checkpoints/:

    step00000100/        DeepSpeed's files for that step, run_state.json (step, consumed
                         samples, resolved config: readable before anything is loaded),
                         and rng_rank{r}.pt per rank
    latest               the tag of the newest *complete* checkpoint

`latest` is replaced atomically, and only after every rank has finished writing, so a
crash in the middle of a save leaves the previous checkpoint as the one to resume from.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pretrain.engine.runtime import barrier

LATEST = "latest"
RUN_STATE = "run_state.json"
_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(directory: str | Path) -> str | None:
    """The tag `latest` names, if that checkpoint exists."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (Path(directory) / tag).is_dir() else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prune(directory: Path, keep_last: int) -> None:
    tags = sorted(p.name for p in directory.iterdir() if p.is_dir() and _TAG.match(p.name))
    for tag in tags[:-keep_last]:
        shutil.rmtree(directory / tag, ignore_errors=True)


def save(
    engine, directory: str | Path, step: int, run_state: dict, keep_last: int, rank: int
) -> str:
    """Save on every rank; returns the tag. `run_state` must be JSON-serialisable."""
    directory, tag = Path(directory), tag_for(step)
    engine.save_checkpoint(str(directory), tag=tag, client_state=run_state, save_latest=False)
    torch.save(_rng_state(), directory / tag / f"rng_rank{rank}.pt")
    if rank == 0:
        (directory / tag / RUN_STATE).write_text(json.dumps(run_state, indent=2) + "\n")
    barrier()  # every rank's files are on disk before `latest` moves
    if rank == 0:
        _write_atomically(directory / LATEST, tag)
        _prune(directory, keep_last)
    barrier()
    return tag


def read_run_state(directory: str | Path, tag: str) -> dict:
    """The run state saved with checkpoint `tag`, without loading any tensor."""
    return json.loads((Path(directory) / tag / RUN_STATE).read_text())


def load(engine, directory: str | Path, tag: str, rank: int) -> None:
    """Load model, optimizer, scheduler and this rank's RNG state into `engine`."""
    directory = Path(directory)
    engine.load_checkpoint(
        str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    rng = directory / tag / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
