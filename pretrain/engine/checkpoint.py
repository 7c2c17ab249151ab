"""Checkpoints: DeepSpeed's own format plus our client state, saved crash-safely, verified
before they are trusted, and read without unpickling arbitrary objects.

Layout under <output_dir>/checkpoints/:

    step00000100/        DeepSpeed's files for that step, run_state.json (step, consumed
                         samples, resolved config: readable before anything is loaded),
                         rng_rank{r}.pt per rank, and manifest.json (every other file's
                         size and SHA-256), written last
    latest               the tag of the newest checkpoint, moved after its manifest

A tag whose manifest is missing or does not match its files is not a checkpoint: a save
cut short, a truncated or corrupted file, a file added or removed. Resume and export take
the newest tag that verifies (naming each one skipped), and pruning never deletes a valid
tag while keeping a broken one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from pretrain.config import Config, ConfigError, to_dict
from pretrain.engine.runtime import barrier
from pretrain.errors import UserError

LATEST = "latest"
RUN_STATE = "run_state.json"
MANIFEST = "manifest.json"
_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


# -- integrity -------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(tag_dir: Path) -> set[str]:
    return {p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file()} - {
        MANIFEST
    }


def write_manifest(tag_dir: Path) -> None:
    """Record every file of a finished save: its size and SHA-256."""
    files = {
        name: {"bytes": (tag_dir / name).stat().st_size, "sha256": _sha256(tag_dir / name)}
        for name in sorted(_files(tag_dir))
    }
    _write_atomically(tag_dir / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))


def verify(tag_dir: Path, hashes: bool = True) -> str | None:
    """None when `tag_dir` is a whole checkpoint, else what is wrong with it. Without
    `hashes`, only names and sizes are checked (enough to tell a save cut short)."""
    try:
        entries = json.loads((tag_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (a save that did not finish)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    present = _files(tag_dir)
    if missing := sorted(set(entries) - present):
        return f"missing {', '.join(missing)}"
    if extra := sorted(present - set(entries)):
        return f"files its manifest does not list: {', '.join(extra)}"
    for name, entry in entries.items():
        size = (tag_dir / name).stat().st_size
        if size != entry["bytes"]:
            return f"{name} is {size} bytes, its manifest says {entry['bytes']}"
        if hashes and _sha256(tag_dir / name) != entry["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def step_tags(directory: Path) -> list[str]:
    """Every step folder under `directory`, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and _TAG.match(p.name))


def newest_valid(directory: str | Path) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest tag that verifies, and the (tag, problem) of each newer one skipped."""
    directory, skipped = Path(directory), []
    for tag in reversed(step_tags(directory)):
        problem = verify(directory / tag)
        if problem is None:
            return tag, skipped
        skipped.append((tag, problem))
    return None, skipped


def has_checkpoint(directory: str | Path) -> bool:
    """A whole checkpoint (names and sizes) exists under `directory`."""
    return any(
        verify(Path(directory) / t, hashes=False) is None for t in step_tags(Path(directory))
    )


def check_tag(directory: str | Path, tag: str) -> None:
    """An explicitly requested tag must exist and verify."""
    tags = step_tags(Path(directory))
    if tag not in tags:
        available = ", ".join(tags) or "none"
        raise UserError(f"checkpoint tag {tag!r} not found in {directory}; available: {available}")
    if problem := verify(Path(directory) / tag):
        raise UserError(f"checkpoint {Path(directory) / tag} does not verify: {problem}")


# -- loading without unpickling code ----------------------------------------------------

# The only classes DeepSpeed's checkpoint files hold besides tensors and plain containers
# (found with torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3, fp32,
# bf16 and fp16 saves): each is rebuilt from data, none runs code of the file's choosing.
SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
_torch_load = torch.load  # the real one, also while the exporter patches torch.load


def safe_load(path: str | Path, map_location=None, mmap: bool | None = None) -> Any:
    """torch.load with `weights_only=True` and only `SAFE_GLOBALS` allowed; anything else in
    the file is one clear error, and nothing in it runs."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return _torch_load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        raise refused(path, err) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


def refused(path: str | Path, err: pickle.UnpicklingError) -> UserError:
    """The one line for a file that a weights-only load refused, naming what it holds."""
    named = re.search(r"GLOBAL ([\w.]+)", str(err))
    if named is None:
        return UserError(
            f"cannot read {path}: it is not a file torch.save wrote (corrupt or replaced);"
            " restore it, or delete its checkpoint folder to resume from an older one"
        )
    return UserError(
        f"refusing to load {path}: it holds objects other than tensors and plain data"
        f" (it names {named.group(1)}); it was not written by this stack"
    )


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside goes through `safe_load`: DeepSpeed's converters and
    loaders (zero_to_fp32, ds_to_universal, the universal loads of ZeRO's optimizers) call
    torch.load themselves, with weights_only=False."""

    def load(f, map_location=None, mmap=None, **_):
        return safe_load(f, map_location, mmap)

    with mock.patch.object(torch, "load", load):
        yield


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, with every load through `safe_load` (its own
    loads unpickle with weights_only=False)."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)


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
    """Keep the newest `keep_last` valid tags. A broken tag goes only once a newer valid one
    exists; one newer than every valid tag is left for a person to look at."""
    tags = step_tags(directory)
    valid = [t for t in tags if verify(directory / t, hashes=False) is None]
    if not valid:
        return
    keep, newest = set(valid[-keep_last:]), valid[-1]
    for tag in tags:
        if tag not in keep and tag < newest:
            shutil.rmtree(directory / tag, ignore_errors=True)


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
        _write_atomically(directory / LATEST, tag)
        _prune(directory, keep_last)
    barrier()
    return tag


def read_run_state(directory: str | Path, tag: str) -> dict:
    """The run state saved with checkpoint `tag`, without loading any tensor."""
    return json.loads((Path(directory) / tag / RUN_STATE).read_text())


class ResumeError(ConfigError):
    """A checkpoint this run cannot continue from (every rank reads the same run state)."""

    collective = True


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


SCHEDULE_KEYS = ("optim.lr", "optim.warmup_steps", "optim.decay", "optim.min_lr_ratio")


def schedule_changes(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, value now) of each LR-schedule setting this run changes.
    max_steps shapes the schedule only when it decays."""
    before, now = _flatten(saved["config"]), _flatten(cfg.to_dict())
    keys = list(SCHEDULE_KEYS)
    if cfg.optim.decay != "constant" or before["optim.decay"] != "constant":
        keys.append("train.max_steps")
    return [(k, before[k], now[k]) for k in keys if before[k] != now[k]]


def check_resumable(
    saved: dict, cfg: Config, tokenizer_checksum: str, world: int, where: str
) -> list[tuple[str, object, object]]:
    """A checkpoint continues only the same model on the same tokenizer and engine layout,
    and its LR schedule unless asked to re-plan it. Returns the schedule changes allowed."""
    now = _flatten(to_dict(cfg.model), "model.")
    before = _flatten(saved["config"]["model"], "model.")
    changed = [k for k in sorted(now) if before.get(k) != now[k]]
    if changed:
        k = changed[0]
        raise ResumeError(
            f"cannot resume from {where}: {k} is {before.get(k)!r} there and {now[k]!r} now;"
            " restore the model config or start a new train.output_dir"
        )
    if saved["tokenizer_checksum"] != tokenizer_checksum:
        raise ResumeError(
            f"cannot resume from {where}: it was trained on shards of another tokenizer;"
            " use the original data.path or a new train.output_dir"
        )
    step = saved["step"]
    if step > cfg.train.max_steps:
        raise ResumeError(
            f"cannot resume from {where}: it is at step {step}, past train.max_steps"
            f" ({cfg.train.max_steps}); raise train.max_steps or start a new train.output_dir"
        )
    schedule = schedule_changes(saved, cfg)
    if schedule and not cfg.train.replan_schedule:
        key, before, now = schedule[0]
        raise ResumeError(
            f"cannot resume from {where} with {key}={now!r}: its LR schedule was planned with"
            f" {key}={before!r}; pass --train.replan_schedule=true to re-plan the LR from"
            f" step {step} with the new settings, or restore {key}"
        )
    stage = saved["config"]["engine"]["zero_stage"]
    if (saved["world_size"], stage) != (world, cfg.engine.zero_stage):
        raise ResumeError(
            f"cannot resume from {where}: it was saved by {saved['world_size']} ranks with ZeRO"
            f" stage {stage}, this run has {world} with stage {cfg.engine.zero_stage};"
            " resume with the same number of ranks and engine.zero_stage"
        )
    return schedule


def load(engine, directory: str | Path, tag: str, rank: int) -> None:
    """Load model, optimizer, scheduler and this rank's RNG state into `engine`."""
    directory = Path(directory)
    if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
        engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    engine.load_checkpoint(
        str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    rng = directory / tag / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(safe_load(rng))
