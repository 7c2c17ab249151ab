"""Checkpoints: DeepSpeed's own format plus our client state, saved crash-safely, verified
before they are trusted, and read without unpickling arbitrary objects.

Layout under <output_dir>/checkpoints/:

    step00000100/        DeepSpeed's files for that step, run_state.json (step, consumed
                         samples, resolved config: readable before anything is loaded),
                         rng_rank{r}.pt per rank, and manifest.json (every other file's
                         size and SHA-256), written last
    latest               the tag of the newest checkpoint, moved after its manifest
    step00000100/universal/
                         the same checkpoint converted for another layout (rank count, ZeRO
                         stage, precision) by DeepSpeed's universal checkpoint, with a
                         manifest of its own; derived from the tag, so outside the tag's
                         manifest and removed with it

The manifest lives in engine/manifest.py, weights-only loading in engine/weights.py, the
resume policy in engine/resume.py and resharding in engine/universal.py; this module saves
and loads.

A tag whose manifest is missing or does not match its files is not a checkpoint: a save
cut short, a truncated or corrupted file, a file added or removed. Resume and export take
the newest tag that verifies (naming each one skipped), and pruning never deletes a valid
tag while keeping a broken one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from pretrain.engine.manifest import (
    LATEST,
    RUN_STATE,
    prune,
    tag_for,
    write_atomically,
    write_manifest,
)
from pretrain.engine.runtime import barrier
from pretrain.engine.universal import load_universal
from pretrain.engine.weights import SafeCheckpointEngine, safe_load


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
        # one state per device of the saving node: this node may have fewer
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def save(
    engine, directory: str | Path, step: int, run_state: dict, keep_last: int, rank: int
) -> str:
    """Save on every rank; returns the tag. `run_state` must be JSON-serialisable."""
    directory, tag = Path(directory), tag_for(step)
    if rank == 0 and (directory / tag).exists():
        shutil.rmtree(directory / tag)  # a broken save of this step from an earlier run
    barrier()
    engine.save_checkpoint(str(directory), tag=tag, client_state=run_state, save_latest=False)
    torch.save(_rng_state(), directory / tag / f"rng_rank{rank}.pt")
    if rank == 0:
        (directory / tag / RUN_STATE).write_text(json.dumps(run_state, indent=2) + "\n")
    barrier()  # every rank's files are on disk before the manifest is written
    if rank == 0:
        write_manifest(directory / tag)
        write_atomically(directory / LATEST, tag)
        prune(directory, keep_last)
    barrier()
    return tag


def load(
    engine, directory: str | Path, tag: str, rank: int, saved_ranks: int, universal: bool = False
) -> None:
    """Load model, optimizer, scheduler and this rank's RNG state into `engine`: from the
    tag as saved, or from its universal form (`prepare_universal`) on another layout."""
    tag_dir = Path(directory) / tag
    if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
        engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    if universal:
        load_universal(engine, tag_dir)
    else:
        engine.load_checkpoint(
            str(tag_dir.parent), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    # A rank the checkpoint had gets its own state back. A rank beyond the saved count gets
    # a seed-derived state, rank 0's: every rank seeds torch with train.seed and draws alike
    # at each step, so that is the state it would hold in a straight run on this layout.
    rng = tag_dir / f"rng_rank{rank if rank < saved_ranks else 0}.pt"
    if rng.is_file():
        _set_rng_state(safe_load(rng))
