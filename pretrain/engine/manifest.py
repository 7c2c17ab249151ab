"""Checkpoint tags on disk, with the standard library only: tag names, the manifest that
says a tag is whole (every other file's size and SHA-256, written last), the `latest`
pointer, the run state and pruning. Export and the preflight read a run's checkpoints
through this module without importing torch or DeepSpeed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from pretrain.errors import UserError

LATEST = "latest"


RUN_STATE = "run_state.json"


MANIFEST = "manifest.json"


UNIVERSAL = "universal"  # <tag>/universal: the tag in DeepSpeed's universal format


_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def sha256(path: Path) -> str:
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
        name: {"bytes": (tag_dir / name).stat().st_size, "sha256": sha256(tag_dir / name)}
        for name in sorted(_files(tag_dir))
    }
    write_atomically(tag_dir / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))


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
        if hashes and sha256(tag_dir / name) != entry["sha256"]:
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


def read_run_state(directory: str | Path, tag: str) -> dict:
    """The run state saved with checkpoint `tag`, without loading any tensor."""
    return json.loads((Path(directory) / tag / RUN_STATE).read_text())


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prune(directory: Path, keep_last: int) -> None:
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
