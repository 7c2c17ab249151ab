"""Raw text -> memory-mapped token shards with a sentence and document index.

Output folder layout (byte-identical across runs of the same command):

    metadata.json                  tokenizer checksum, vocab, dtype, counts, skipped rows
    tokenizer/                     a copy of the tokenizer folder the shards were made with
    {split}-{k:05d}.bin            tokens, uint16 when the vocab fits, else uint32
    {split}-{k:05d}.sentences.npy  int64 (S+1,) token offset of each sentence in the shard
    {split}-{k:05d}.documents.npy  int64 (D+1,) sentence offset of each document

`split` is `train` and, with a held-out share, `valid`. A document never spans shards.
Everything is written to a temporary folder first and moved into place only when complete.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from pretrain.data.index import INDEX_DIR
from pretrain.data.sources import DataError, ReadReport, iter_documents
from pretrain.data.tokenizer import MODEL_FILE, Tokenizer, split_sentences

FORMAT = "pretrain-token-shards/1"
METADATA = "metadata.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens: 256 MiB of uint16 per shard


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


@cache
def _processor(model_path: str):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=model_path)


def tokenize_batch(batch: dict, model_path: str) -> dict:
    """datasets.map function: documents -> token ids and per-sentence lengths."""
    sp = _processor(model_path)
    ids, lengths = [], []
    for text in batch["text"]:
        sentences = [s for s in sp.encode(split_sentences(text)) if s]
        ids.append(np.array(list(itertools.chain.from_iterable(sentences)), dtype=np.int32))
        lengths.append(np.array([len(s) for s in sentences], dtype=np.int32))
    return {"ids": ids, "lengths": lengths}


@dataclass
class _SplitWriter:
    """Appends documents to the shards of one split."""

    directory: Path
    name: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._open()

    def _open(self) -> None:
        stem = f"{self.name}-{len(self.shards):05d}"
        self._stem = stem
        self._file = (self.directory / f"{stem}.bin").open("wb")
        self._sentences = [0]
        self._documents = [0]

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        if self._sentences[-1] and self._sentences[-1] + len(ids) > self.shard_tokens:
            self._close()
            self._open()
        self._file.write(ids.astype(self.dtype).tobytes())
        self._sentences.extend((self._sentences[-1] + np.cumsum(lengths)).tolist())
        self._documents.append(len(self._sentences) - 1)

    def _close(self) -> None:
        self._file.close()
        np.save(self.directory / f"{self._stem}.sentences.npy", np.array(self._sentences, np.int64))
        np.save(self.directory / f"{self._stem}.documents.npy", np.array(self._documents, np.int64))
        self.shards.append(
            {
                "name": self._stem,
                "documents": len(self._documents) - 1,
                "sentences": len(self._sentences) - 1,
                "tokens": self._sentences[-1],
            }
        )

    def finish(self) -> dict:
        self._close()
        return {
            key: sum(s[key] for s in self.shards) for key in ("documents", "sentences", "tokens")
        } | {"shards": self.shards}


def _held_out_documents(n: int, held_out: float, seed: int) -> set[int]:
    """Document indices of the held-out split: a fraction (< 1) or a count (>= 1)."""
    if held_out <= 0:
        return set()
    k = int(held_out) if held_out >= 1 else max(1, round(held_out * n))
    if k >= n:
        raise DataError(
            f"--held-out {held_out} takes {k} of {n} documents and leaves none for training;"
            " lower it"
        )
    return set(np.random.default_rng(seed).permutation(n)[:k].tolist())


def _write_documents_arrow(docs, path: Path) -> int:
    """Stream documents into an Arrow file, so that datasets can map over it from disk."""
    import pyarrow as pa

    schema = pa.schema([("text", pa.large_string())])
    count, batch = 0, []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for doc in docs:
            batch.append(doc)
            if len(batch) == 1024:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())], schema))
                count, batch = count + len(batch), []
        if batch:
            writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())], schema))
            count += len(batch)
    return count


def _same_folder(a: Path, b: Path) -> bool:
    """Whether two data folders hold the same files, sample indexes left out (they are built
    from the shards by training: pretrain.data.index)."""

    def files(root: Path) -> list[Path]:
        found = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
        return sorted(p for p in found if p.parts[0] != INDEX_DIR)

    names = files(a)
    return names == files(b) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def _check_output(output: Path) -> None:
    if output.is_file():
        raise DataError(f"--output {output} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / METADATA).is_file():
        raise DataError(
            f"--output {output} already holds other files; choose an empty or new folder"
        )


def preprocess(
    inputs: list[str],
    tokenizer_dir: str | Path,
    output: str | Path,
    text_field: str = "text",
    num_proc: int = 1,
    held_out: float = 0.0,
    seed: int = 1234,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    streaming: bool = False,
) -> dict:
    """Tokenize `inputs` into shards in `output`; returns the metadata written.
    `streaming`: stream `hf:` datasets (pretrain.data.sources.iter_documents)."""
    import datasets

    output = Path(output)
    _check_output(output)
    tokenizer = Tokenizer(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        report = ReadReport()
        docs_path = work / "documents.arrow"
        n_docs = _write_documents_arrow(
            iter_documents(inputs, text_field, report, streaming), docs_path
        )
        if n_docs == 0:
            raise DataError(f"no text found in the inputs: {report.summary()}")
        tokenized = datasets.Dataset.from_file(str(docs_path)).map(
            tokenize_batch,
            batched=True,
            batch_size=16,
            num_proc=num_proc if num_proc > 1 else None,
            fn_kwargs={"model_path": str(tokenizer.directory / MODEL_FILE)},
            remove_columns=["text"],
            cache_file_name=str(work / "tokens.arrow"),
            desc="tokenizing",
        )
        shards = work / "shards"
        shards.mkdir()
        valid = _held_out_documents(n_docs, held_out, seed)
        writers = {"train": _SplitWriter(shards, "train", dtype, shard_tokens)}
        if valid:
            writers["valid"] = _SplitWriter(shards, "valid", dtype, shard_tokens)
        index = 0
        for batch in tokenized.with_format("numpy").iter(batch_size=256):
            for ids, lengths in zip(batch["ids"], batch["lengths"], strict=True):
                if len(ids) == 0:
                    report.skip("empty_after_tokenization", f"document {index}")
                else:
                    writers["valid" if index in valid else "train"].add(ids, lengths)
                index += 1
        metadata = {
            "format": FORMAT,
            "tokenizer": {
                "checksum": tokenizer.info.checksum,
                "vocab_size": tokenizer.vocab_size,
                "special_ids": tokenizer.info.special_ids,
            },
            "dtype": dtype.name,
            "text_field": text_field,
            "held_out": float(held_out),
            "seed": seed,
            "splits": {name: w.finish() for name, w in writers.items()},
            "read": {
                "files": report.files,
                "documents": report.documents,
                "skipped": dict(sorted(report.skipped.items())),
                "first_problem": dict(sorted(report.first_problem.items())),
                "replaced_utf8": report.replaced_utf8,
                "decoded": dict(sorted(report.decoded.items())),
                "ignored_files": report.ignored_files,
            },
        }
        (shards / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        # The data folder carries its tokenizer: loaders need its pieces (word starts) and
        # checkpoints and exports take it from here.
        shutil.copytree(tokenizer.directory, shards / TOKENIZER_DIR)
        _install(shards, output)
        return metadata
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _install(shards: Path, output: Path) -> None:
    """Move the finished shards into place; an identical existing output is left as is."""
    if output.is_dir() and any(output.iterdir()):
        if _same_folder(shards, output):
            return
        raise DataError(
            f"--output {output} already holds different preprocessed data; choose another"
            " folder or delete it first"
        )
    if output.is_dir():
        output.rmdir()
    os.replace(shards, output)
