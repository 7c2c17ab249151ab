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

A tag whose manifest is missing or does not match its files is not a checkpoint: a save
cut short, a truncated or corrupted file, a file added or removed. Resume and export take
the newest tag that verifies (naming each one skipped), and pruning never deletes a valid
tag while keeping a broken one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import deepspeed
import torch
from deepspeed.checkpoint import ds_to_universal
from deepspeed.checkpoint.constants import (
    DS_VERSION,
    FP32_FLAT_GROUPS,
    OPTIMIZER_STATE_DICT,
    PARAM,
    PARAM_GROUPS,
    PARAM_SHAPES,
)
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from pretrain import pickles
from pretrain.config import Config, ConfigError, to_dict
from pretrain.config.reference import flat
from pretrain.engine.runtime import barrier, broadcast_object
from pretrain.errors import UserError

LATEST = "latest"
RUN_STATE = "run_state.json"
MANIFEST = "manifest.json"
UNIVERSAL = "universal"  # <tag>/universal: the tag in DeepSpeed's universal format
_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


# -- integrity -------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(tag_dir: Path) -> set[str]:
    """Every file a manifest lists: all but the manifest and the tag's universal form (which
    a later run derives from the tag, with a manifest of its own)."""
    names = {p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file()}
    return {n for n in names if n != MANIFEST and not n.startswith(f"{UNIVERSAL}/")}


def write_manifest(tag_dir: Path) -> None:
    """Record every file of a finished save: its size and SHA-256."""
    files = {
        name: {"bytes": (tag_dir / name).stat().st_size, "sha256": _sha256(tag_dir / name)}
        for name in sorted(_files(tag_dir))
    }
    _write_atomically(tag_dir / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))


def manifest_problem(tag_dir: Path, hashes: bool = True) -> str | None:
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
        problem = manifest_problem(directory / tag)
        if problem is None:
            return tag, skipped
        skipped.append((tag, problem))
    return None, skipped


def has_checkpoint(directory: str | Path) -> bool:
    """A whole checkpoint (names and sizes) exists under `directory`."""
    tags = step_tags(Path(directory))
    return any(manifest_problem(Path(directory) / t, hashes=False) is None for t in tags)


def check_tag(directory: str | Path, tag: str) -> None:
    """An explicitly requested tag must exist and verify."""
    tags = step_tags(Path(directory))
    if tag not in tags:
        available = ", ".join(tags) or "none"
        raise UserError(f"checkpoint tag {tag!r} not found in {directory}; available: {available}")
    if problem := manifest_problem(Path(directory) / tag):
        raise UserError(f"checkpoint {Path(directory) / tag} does not verify: {problem}")


# -- loading without unpickling code ----------------------------------------------------

# The only classes DeepSpeed's checkpoint files hold besides tensors and plain containers
# (found with torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3, fp32,
# bf16 and fp16 saves): each is rebuilt from data, none runs code of the file's choosing.
SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
NOT_OURS = "it was not written by this stack"
RESTORE = "restore it, or delete its checkpoint folder to resume from an older one"


def safe_load(path: str | Path, map_location=None, mmap: bool | None = None) -> Any:
    """torch.load with `weights_only=True` and only `SAFE_GLOBALS` allowed; anything else in
    the file is one clear error, and nothing in it runs."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return pickles.load_tensors(path, map_location, mmap, hostile=NOT_OURS, corrupt=RESTORE)


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
        # one state per device of the saving node: this node may have fewer
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _prune(directory: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` valid tags. A broken tag goes only once a newer valid one
    exists; one newer than every valid tag is left for a person to look at."""
    tags = step_tags(directory)
    valid = [t for t in tags if manifest_problem(directory / t, hashes=False) is None]
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


SCHEDULE_KEYS = ("optim.lr", "optim.warmup_steps", "optim.decay", "optim.min_lr_ratio")


def schedule_changes(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, value now) of each LR-schedule setting this run changes.
    max_steps shapes the schedule only when it decays."""
    before, now = flat(saved["config"]), flat(cfg.to_dict())
    keys = list(SCHEDULE_KEYS)
    if cfg.optim.decay != "constant" or before["optim.decay"] != "constant":
        keys.append("train.max_steps")
    return [(k, before[k], now[k]) for k in keys if before[k] != now[k]]


LOSS_SECTIONS = ("objective", "distill")


def loss_changes(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, value now) of each setting of the loss (objective.*, distill.*:
    the terms, their weights, the masking, the teacher) this run changes. A key the
    checkpoint's config lacks had its default then."""
    changes = []
    for section in LOSS_SECTIONS:
        ours = getattr(cfg, section)
        now = flat(to_dict(ours), f"{section}.")
        default = flat(to_dict(type(ours)()), f"{section}.")
        before = {**default, **flat(saved["config"].get(section, {}), f"{section}.")}
        changes += [(k, before[k], v) for k, v in now.items() if before[k] != v]
    return changes


def check_resumable(
    saved: dict, cfg: Config, tokenizer_checksum: str, world: int, where: str
) -> list[tuple[str, object, object]]:
    """A checkpoint continues only the same model on the same tokenizer, and its LR
    schedule and its loss unless asked to change them; on another layout (ranks, ZeRO
    stage, precision) only where DeepSpeed can reshard it. Returns the schedule changes
    allowed."""
    now = flat(to_dict(cfg.model), "model.")
    before = flat(saved["config"]["model"], "model.")
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
    loss = loss_changes(saved, cfg)
    if loss and not cfg.train.allow_loss_change:
        key, before, now = loss[0]
        raise ResumeError(
            f"cannot resume from {where} with {key}={now!r}: it was trained with"
            f" {key}={before!r}, and its steps would go on under another loss; restore {key},"
            " or pass --train.allow_loss_change=true to go on with the new one"
        )
    check_reshardable(saved_layout(saved), layout(cfg, world), where)
    return schedule


def load(
    engine, directory: str | Path, tag: str, rank: int, saved_ranks: int, universal: bool = False
) -> None:
    """Load model, optimizer, scheduler and this rank's RNG state into `engine`: from the
    tag as saved, or from its universal form (`prepare_universal`) on another layout."""
    tag_dir = Path(directory) / tag
    if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
        engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    if universal:
        _load_universal(engine, tag_dir)
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


# -- resharding: a checkpoint resumed on another layout ----------------------------------


@dataclass(frozen=True)
class Layout:
    """How a run holds its states: ranks, ZeRO stage, precision and pipeline stages."""

    ranks: int
    zero_stage: int
    precision: str
    pipeline_stages: int = 1

    def __str__(self) -> str:
        ranks = f"{self.ranks} rank{'s' if self.ranks > 1 else ''}"
        pipeline = f", {self.pipeline_stages} pipeline stages" if self.pipeline_stages > 1 else ""
        return f"{ranks} ZeRO-{self.zero_stage} {self.precision}{pipeline}"


def layout(cfg: Config, ranks: int) -> Layout:
    """The layout of a run of `cfg` on `ranks` ranks."""
    engine = cfg.engine
    return Layout(ranks, engine.zero_stage, engine.precision, engine.pipeline_stages)


def saved_layout(saved: dict) -> Layout:
    """The layout of the run that saved `saved` (its run state)."""
    engine = saved["config"]["engine"]
    stages = engine.get("pipeline_stages", 1)  # saved before pipelines existed
    return Layout(saved["world_size"], engine["zero_stage"], engine["precision"], stages)


def needs_resharding(before: Layout, now: Layout) -> bool:
    """Another layout loads from the universal form, except between ZeRO-0 runs: ZeRO-0
    keeps whole states on every rank, which any rank count loads as saved."""
    return before != now and not before.zero_stage == now.zero_stage == 0


def check_reshardable(before: Layout, now: Layout, where: str) -> None:
    """A layout the universal form cannot carry `before` over to is one line."""
    if refused := _not_reshardable(before, now):
        reason, fix = refused
        raise ResumeError(
            f"cannot resume from {where} (saved by {before}) with {now}: {reason};"
            f" resume with {fix}"
        )


def _not_reshardable(before: Layout, now: Layout) -> tuple[str, str] | None:
    """(why, the fix) where DeepSpeed cannot convert: it converts the partitioned states
    of ZeRO stages 1-3 (their fp32 master weights into another precision too), but neither
    reads nor writes ZeRO-0's whole states; fp16's loss scale has no counterpart in the
    other precisions; a pipeline's per-layer files are not resharded here."""
    if before != now and max(before.pipeline_stages, now.pipeline_stages) > 1:
        return "a pipelined checkpoint continues only on its own layout", f"{before}"
    stages = {before.zero_stage, now.zero_stage}
    if 0 in stages and len(stages) > 1:
        fix = "engine.zero_stage=0" if before.zero_stage == 0 else "engine.zero_stage 1-3"
        return "DeepSpeed reshards only between ZeRO stages 1-3", fix
    if before.precision == now.precision:
        return None
    fix = f"engine.precision={before.precision}"
    if 0 in stages:
        return "DeepSpeed converts a precision only at ZeRO stages 1-3", fix
    if "fp16" in (before.precision, now.precision):
        return "fp16's dynamic loss scale does not carry over to another precision", fix
    return None


_PARTIAL = ".universal.partial"  # under checkpoints/, while rank 0 converts
_SOURCE = "source.json"  # in the universal form: the SHA-256 of the tag's manifest
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_OPTIMIZER_STATE = Path("zero") / "optimizer_state.pt"


def prepare_universal(directory: str | Path, tag: str, rank: int, where: str) -> None:
    """Collective: rank 0 converts checkpoint `tag` into `<tag>/universal`, unless an
    earlier resume did, while the others wait; a failure is the same error on every rank."""
    problem = None
    if rank == 0:
        try:
            _convert_once(Path(directory) / tag)
        except UserError as err:
            problem = str(err)
        except Exception as err:  # DeepSpeed's converter: one line for every rank, not a hang
            first = (str(err).strip().splitlines() or [""])[0]
            before = saved_layout(read_run_state(directory, tag))
            problem = (
                f"cannot reshard {where}: DeepSpeed's universal conversion failed"
                f" ({type(err).__name__}: {first}); resume on {before}, as it was saved"
            )
    problem = broadcast_object(problem)
    if problem is not None:
        raise ResumeError(problem)


def _convert_once(tag_dir: Path) -> bool:
    """Convert `tag_dir` unless a whole conversion of it is there; True when it was. Written
    under another name and renamed when complete, so a killed conversion is never used."""
    target = tag_dir / UNIVERSAL
    source = {"manifest_sha256": _sha256(tag_dir / MANIFEST)}
    if manifest_problem(target) is None and json.loads((target / _SOURCE).read_text()) == source:
        return True
    # The converter reads every file under the tag: no earlier attempt may lie inside it.
    shutil.rmtree(target, ignore_errors=True)
    partial = tag_dir.parent / _PARTIAL
    shutil.rmtree(partial, ignore_errors=True)  # what a killed conversion left
    try:
        out = partial / UNIVERSAL
        _ds_to_universal(tag_dir, out)
        _complete_for_every_stage(out)
        (out / _SOURCE).write_text(json.dumps(source) + "\n")
        write_manifest(out)
        os.replace(out, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return False


def _ds_to_universal(tag_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process (so that its loads are weights-only)
    and quiet (its progress bars and step list)."""
    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(out),
        num_extract_workers=1,  # no worker processes: they would load without the patch
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our model declares no tensor-parallel slices
    )
    quiet = io.StringIO()
    with weights_only_loads(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        ds_to_universal.main(args)


def _complete_for_every_stage(out: Path) -> None:
    """ds_to_universal writes what the saved stage's family of loaders reads, and DeepSpeed
    0.19.8's ZeRO-1/2 and ZeRO-3 universal loaders read different things. Add the other's,
    so one conversion loads at any stage 1-3."""
    _link_model_states(out)
    state = safe_load(out / _OPTIMIZER_STATE)
    zero3 = OPTIMIZER_STATE_DICT in state  # the conversion of a ZeRO-3 save
    step = _optimizer_step(out, state)
    _write_optimizer_state(out, state, step)
    if zero3:
        _shape_zero3_states(out, step)


def _link_model_states(out: Path) -> None:
    """Each loader reads the model-states file (LR scheduler, step counts) under its own
    stage's name."""
    present = next(out / name for name in _MODEL_STATES if (out / name).is_file())
    for name in _MODEL_STATES:
        if not (out / name).exists():
            try:
                os.link(present, out / name)  # the same bytes: no second copy on disk
            except OSError:  # a file system without hard links
                shutil.copyfile(present, out / name)


def _write_optimizer_state(out: Path, state: dict, step: Any) -> None:
    """ZeRO-3's loader reads the step and group settings from an optimizer state dict (a
    ZeRO-3 save holds rank 0's flat partitions there too, which nothing needs); ZeRO-1/2
    require ds_version."""
    state[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: state[PARAM_GROUPS]}
    state.pop(FP32_FLAT_GROUPS, None)
    state.setdefault(DS_VERSION, deepspeed.__version__)
    torch.save(state, out / _OPTIMIZER_STATE)


def _shape_zero3_states(out: Path, step: Any) -> None:
    """A ZeRO-3 conversion leaves each state a flat tensor, without the step; ZeRO-1/2 read
    {param: tensor of the parameter's shape} and the step beside it."""
    shapes: dict[str, torch.Size] = {}
    for group in safe_load(out / _MODEL_STATES[1])[PARAM_SHAPES]:
        shapes |= group
    for name, shape in shapes.items():
        folder = out / "zero" / name
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            flat = safe_load(folder / f"{key}.pt")
            torch.save({PARAM: flat.view(shape)}, folder / f"{key}.pt")
        torch.save(step, folder / "step.pt")


def _optimizer_step(out: Path, state: dict) -> Any:
    """The optimizer's step count: ZeRO-3 saves it in its optimizer state dict, ZeRO-1/2
    beside each parameter's moments (one count for all)."""
    if OPTIMIZER_STATE_DICT in state:
        return state[OPTIMIZER_STATE_DICT]["state"][0]["step"]
    return safe_load(next((out / "zero").glob("*/step.pt")))


def _load_universal(engine, tag_dir: Path) -> None:
    config = engine._config
    # DeepSpeed reads load_universal only in load_checkpoint: set for this load alone, the
    # run's DeepSpeed config stays as built.
    config.load_universal_checkpoint = True
    try:
        with weights_only_loads():
            engine.load_checkpoint(
                str(tag_dir),
                tag=UNIVERSAL,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
    finally:
        config.load_universal_checkpoint = False
    groups = safe_load(tag_dir / UNIVERSAL / _OPTIMIZER_STATE)[PARAM_GROUPS]
    optimizer = engine.optimizer.optimizer  # the torch optimizer under ZeRO's
    _restore_group_settings(optimizer, groups)
    _own_steps(optimizer)


def _restore_group_settings(optimizer: torch.optim.Optimizer, saved: list[dict]) -> None:
    """ZeRO-3's universal load gives every parameter group the first group's settings (our
    undecayed group would get weight decay); each group gets its own back, as a same-layout
    load does."""
    for group, before in zip(optimizer.param_groups, saved, strict=True):
        group.update({k: v for k, v in before.items() if k != "params"})


def _own_steps(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's state a step count of its own. ZeRO-3's universal load hands
    every group the same tensor, which torch's Adam increments in place once per group (the
    second group's bias correction would count two steps per step). The counts load on the
    CPU; fused and capturable optimizers keep them on the parameter's device, where torch's
    own load_state_dict puts them."""
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    for param, state in optimizer.state.items():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = step.to(param.device if on_device else step.device).clone()
