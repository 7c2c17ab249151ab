"""Resharding through DeepSpeed 0.19.8's universal checkpoint, and the workarounds it
needs: the conversion run once per tag, in this process and completed for every ZeRO
stage's loader; the universal load with each parameter group's settings and step counts
restored; and `weights_only_loads`, the one place torch.load is patched, for DeepSpeed's
converters that call torch.load themselves."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from collections.abc import Iterator
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

from pretrain.engine.manifest import (
    MANIFEST,
    UNIVERSAL,
    manifest_problem,
    read_run_state,
    sha256,
    write_manifest,
)
from pretrain.engine.resume import ResumeError, saved_layout
from pretrain.engine.runtime import broadcast_object
from pretrain.engine.weights import safe_load
from pretrain.errors import UserError


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside goes through `safe_load`: DeepSpeed's converters and
    loaders (zero_to_fp32, ds_to_universal, the universal loads of ZeRO's optimizers) call
    torch.load themselves, with weights_only=False."""

    def load(f, map_location=None, mmap=None, **_):
        return safe_load(f, map_location, mmap)

    with mock.patch.object(torch, "load", load):
        yield


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
    source = {"manifestsha256": sha256(tag_dir / MANIFEST)}
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


def load_universal(engine, tag_dir: Path) -> None:
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
