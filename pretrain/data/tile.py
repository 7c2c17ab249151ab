"""A corpus K times its size from one already preprocessed: the train split's shards
repeated under new names (hard links where the file system allows, so no disk is used),
the valid split as it is. The documents repeat, the shard count, sentence count and sample
index grow K times: what scaling benchmarks of the index and the loader need."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pretrain.data.preprocess import METADATA, TOKENIZER_DIR
from pretrain.data.shards import read_metadata
from pretrain.data.sources import DataError

SHARD_FILES = (".bin", ".sentences.npy", ".documents.npy")


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def tile_shards(source: str | Path, output: str | Path, times: int) -> dict:
    """Write `output` holding the train split of `source` `times` times; returns its
    metadata."""
    source, output = Path(source), Path(output)
    if times < 1:
        raise DataError(f"--times must be at least 1, got {times}")
    if output.exists():
        raise DataError(f"{output} exists; choose a new folder")
    meta = read_metadata(source)
    output.mkdir(parents=True)
    shutil.copytree(source / TOKENIZER_DIR, output / TOKENIZER_DIR)
    for split, info in meta["splits"].items():
        entries = []
        for _ in range(times if split == "train" else 1):
            for entry in info["shards"]:
                name = f"{split}-{len(entries):05d}"
                for ext in SHARD_FILES:
                    _link(source / f"{entry['name']}{ext}", output / f"{name}{ext}")
                entries.append({**entry, "name": name})
        copies = len(entries) // len(info["shards"])
        meta["splits"][split] = {
            **info,
            "shards": entries,
            **{key: info[key] * copies for key in ("documents", "sentences", "tokens")},
        }
    (output / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
