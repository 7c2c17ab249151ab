"""Raw text -> memory-mapped token shards with a sentence and document index.

Output folder layout (byte-identical across runs of the same command):

    metadata.json                  tokenizer checksum, vocab, dtype, counts, skipped rows
    tokenizer/                     a copy of the tokenizer folder the shards were made with
    {split}-{k:05d}.bin            tokens, uint16 when the vocab fits, else uint32
    {split}-{k:05d}.sentences.npy  int64 (S+1,) token offset of each sentence in the shard
    {split}-{k:05d}.documents.npy  int64 (D+1,) sentence offset of each document

`split` is `train` and, with a held-out share, `valid`: a document is held out by a keyed
hash of its text (HeldOut), so no process needs to see the others' documents. A document
never spans shards. Text streams from the readers to the tokenizer processes and on into the
shards; everything is written to a temporary folder beside the output and moved into place
only when complete, so the disk used is the output's own size.

Across nodes: `preprocess(..., part=Part(i, n))` for each i writes one part (a contiguous run
of the input files), and `merge(parts, output)` joins them into the folder one process over
all the inputs would have written, byte for byte.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from pretrain.data.index import INDEX_DIR
from pretrain.data.sources import DataError, Part, ReadReport, iter_documents
from pretrain.data.tokenizer import MODEL_FILE, Tokenizer, split_sentences

FORMAT = "pretrain-token-shards/1"
METADATA = "metadata.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens: 256 MiB of uint16 per shard
TOKENIZE_BATCH = 64  # documents per task of a tokenizer process
HELD_OUT_RULE = "blake2b-64/1"
"""Of the held-out choice (HeldOut): a keyed 64-bit BLAKE2b of each document's text against a
cutoff. Before it, a seeded permutation of document numbers, which needed every document."""
WHOLE = Part()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


@cache
def _processor(model_path: str):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=model_path)


def tokenize_documents(texts: list[str], model_path: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Documents -> (token ids, per-sentence lengths) each; empty sentences dropped."""
    sp = _processor(model_path)
    out = []
    for text in texts:
        sentences = [s for s in sp.encode(split_sentences(text)) if s]
        ids = np.fromiter(itertools.chain.from_iterable(sentences), np.int32)
        out.append((ids, np.array([len(s) for s in sentences], dtype=np.int32)))
    return out


def _tokenized(
    texts: Iterable[str], model_path: str, num_proc: int
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(text, ids, lengths) per document, in input order. Text goes to the tokenizer as it is
    read: `num_proc` processes take batches of documents, a bounded number in flight."""
    texts = iter(texts)
    batches = iter(lambda: list(itertools.islice(texts, TOKENIZE_BATCH)), [])
    if num_proc <= 1:
        for batch in batches:
            yield from _joined(batch, tokenize_documents(batch, model_path))
        return
    # Fork where there is one: spawn would re-run the caller's main module in each worker.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(num_proc, mp_context=context) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.submit(tokenize_documents, batch, model_path)))
            if len(pending) > 2 * num_proc:
                done, future = pending.popleft()
                yield from _joined(done, future.result())
        while pending:
            done, future = pending.popleft()
            yield from _joined(done, future.result())


def _joined(texts, tokens):
    for text, (ids, lengths) in zip(texts, tokens, strict=True):
        yield text, ids, lengths


@dataclass
class _SplitWriter:
    """Appends documents to the shards of one split: a shard takes documents while they fit
    in `shard_tokens` (its first one always)."""

    directory: Path
    name: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._open()

    def _open(self) -> None:
        self._stem = f"{self.name}-{len(self.shards):05d}"
        self._file = (self.directory / f"{self._stem}.bin").open("wb")
        self._tokens = self._sentences = self._documents = 0
        # Offsets kept as arrays per write, joined at close: a Python int per sentence
        # would cost tens of bytes each at billions of tokens.
        self._sentence_offsets = [np.zeros(1, np.int64)]
        self._document_offsets = [np.zeros(1, np.int64)]

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """One document: token ids and its sentences' lengths."""
        sentences = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.add_documents(ids, sentences, np.array([0, len(lengths)], np.int64))

    def add_documents(
        self, tokens_N: np.ndarray, sentences_S1: np.ndarray, documents_D1: np.ndarray
    ) -> None:
        """Documents given as a shard holds them: tokens, the token offset of each sentence
        and the sentence offset of each document (both from 0)."""
        starts_D1 = sentences_S1[documents_D1]  # token offset of each document
        first, count = 0, len(documents_D1) - 1
        while first < count:
            room = self.shard_tokens - self._tokens
            end = int(np.searchsorted(starts_D1, starts_D1[first] + room, side="right")) - 1
            if end == first and self._tokens:
                self._close()
                self._open()
                continue
            self._write(tokens_N, sentences_S1, documents_D1, first, max(end, first + 1))
            first = max(end, first + 1)

    def _write(self, tokens_N, sentences_S1, documents_D1, first: int, end: int) -> None:
        s0, s1 = int(documents_D1[first]), int(documents_D1[end])
        t0, t1 = int(sentences_S1[s0]), int(sentences_S1[s1])
        self._file.write(np.ascontiguousarray(tokens_N[t0:t1], dtype=self.dtype).tobytes())
        self._sentence_offsets.append(sentences_S1[s0 + 1 : s1 + 1] - t0 + self._tokens)
        self._document_offsets.append(documents_D1[first + 1 : end + 1] - s0 + self._sentences)
        self._tokens += t1 - t0
        self._sentences += s1 - s0
        self._documents += end - first

    def _close(self) -> None:
        self._file.close()
        for kind, offsets in (
            ("sentences", self._sentence_offsets),
            ("documents", self._document_offsets),
        ):
            np.save(self.directory / f"{self._stem}.{kind}.npy", np.concatenate(offsets))
        self.shards.append(
            {
                "name": self._stem,
                "documents": self._documents,
                "sentences": self._sentences,
                "tokens": self._tokens,
            }
        )

    def finish(self) -> dict:
        self._close()
        return {
            key: sum(s[key] for s in self.shards) for key in ("documents", "sentences", "tokens")
        } | {"shards": self.shards}


def _document_hash(text: str, seed: int) -> int:
    """64 bits of a keyed BLAKE2b of the document's text: the same on every machine."""
    digest = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little")
    ).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class HeldOut:
    """Which documents form the held-out split: those whose hash is below `cutoff`. Decided
    by each document's text and the seed alone, so that parts of a corpus preprocessed apart
    agree (and copies of a document land in the same split)."""

    cutoff: int
    seed: int

    def __call__(self, text: str) -> bool:
        return self.cutoff > 0 and _document_hash(text, self.seed) < self.cutoff

    @classmethod
    def choose(cls, held_out: float, seed: int, count_documents) -> HeldOut:
        """A fraction (< 1) holds out about that share; a count (>= 1) exactly the documents
        of the `held_out` lowest hashes, which costs one pass over the inputs' text:
        `count_documents()` yields every document's text."""
        if held_out <= 0:
            return cls(0, seed)
        if held_out < 1:
            return cls(int(held_out * 2.0**64), seed)
        hashes = np.fromiter((_document_hash(t, seed) for t in count_documents()), np.uint64)
        k = int(held_out)
        if k >= len(hashes):
            raise DataError(
                f"--held-out {held_out:g} takes {k} of {len(hashes)} documents and leaves none"
                " for training; lower it"
            )
        return cls(int(np.partition(hashes, k - 1)[k - 1]) + 1, seed)


def same_folder(a: Path, b: Path) -> bool:
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
    part: Part = WHOLE,
) -> dict:
    """Tokenize `inputs` (or `part` of them) into shards in `output`; returns the metadata
    written. `streaming`: stream `hf:` datasets (pretrain.data.sources.iter_documents). The
    only disk used besides the output is the output itself, written next to it first."""
    output = Path(output)
    _check_output(output)
    tokenizer = Tokenizer(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    if part.count > 1 and held_out >= 1:
        raise DataError(
            f"--held-out {held_out:g} is a count, which needs the whole corpus; with"
            " --num-parts give a fraction (e.g. --held-out 0.001)"
        )
    rule = HeldOut.choose(
        held_out,
        seed,
        lambda: iter_documents(inputs, text_field, ReadReport(), streaming, part),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        report = ReadReport()
        writers = {"train": _SplitWriter(work, "train", dtype, shard_tokens)}
        if held_out > 0:
            writers["valid"] = _SplitWriter(work, "valid", dtype, shard_tokens)
        docs = iter_documents(inputs, text_field, report, streaming, part)
        model_path = str(tokenizer.directory / MODEL_FILE)
        first_empty = None
        for index, (text, ids, lengths) in enumerate(_tokenized(docs, model_path, num_proc)):
            if len(ids) == 0:
                first_empty = index if first_empty is None else first_empty
                report.skip("empty_after_tokenization", f"document {index}")
            else:
                writers["valid" if rule(text) else "train"].add(ids, lengths)
        if report.documents == 0:
            raise DataError(f"no text found in the inputs: {report.summary()}")
        identity = {
            "checksum": tokenizer.info.checksum,
            "vocab_size": tokenizer.vocab_size,
            "special_ids": tokenizer.info.special_ids,
        }
        metadata = _metadata(
            identity, dtype, text_field, held_out, seed, writers, _read_section(report)
        )
        if part.count > 1:
            metadata["part"] = {
                "index": part.index,
                "count": part.count,
                "shard_tokens": shard_tokens,
                "first_empty": first_empty,
            }
        else:
            _check_splits(metadata)
        _finish(work, metadata, tokenizer.directory, output)
        return metadata
    finally:
        shutil.rmtree(work, ignore_errors=True)


def merge(parts: list[str | Path], output: str | Path) -> dict:
    """Join the parts of one corpus (`preprocess(..., part=Part(i, n))` for every i) into one
    data folder: the same shards, byte for byte, as one process over all the inputs."""
    output = Path(output)
    _check_output(output)
    metas = _check_parts([Path(p) for p in parts])
    first = metas[0][1]
    dtype = np.dtype(first["dtype"])
    shard_tokens = first["part"]["shard_tokens"]
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        writers = {
            name: _SplitWriter(work, name, dtype, shard_tokens)
            for name in ("train", "valid")
            if name in first["splits"]
        }
        for name, writer in writers.items():
            for folder, meta in metas:
                for shard in meta["splits"][name]["shards"]:
                    if shard["documents"] == 0:  # a part may hold out none of its documents
                        continue
                    writer.add_documents(*_shard_arrays(folder, shard["name"], dtype))
        metadata = _metadata(
            first["tokenizer"],
            dtype,
            first["text_field"],
            first["held_out"],
            first["seed"],
            writers,
            _merged_read([meta for _, meta in metas]),
        )
        _check_splits(metadata)
        _finish(work, metadata, metas[0][0] / TOKENIZER_DIR, output)
        return metadata
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_parts(folders: list[Path]) -> list[tuple[Path, dict]]:
    """(folder, metadata) of every part in part order, after checking that they are all the
    parts of one preprocessing command."""
    metas = []
    for folder in folders:
        path = folder / METADATA
        meta = json.loads(path.read_text()) if path.is_file() else {}
        if meta.get("format") != FORMAT or "part" not in meta:
            raise DataError(
                f"--merge {folder} is not a preprocessed part ({METADATA} with a part);"
                " give the folders that tools/preprocess.py --num-parts N --part I wrote"
            )
        metas.append((folder, meta))
    metas.sort(key=lambda fm: fm[1]["part"]["index"])
    count = metas[0][1]["part"]["count"]
    indices = [meta["part"]["index"] for _, meta in metas]
    if indices != list(range(count)) or any(m["part"]["count"] != count for _, m in metas):
        missing = sorted(set(range(count)) - set(indices))
        raise DataError(
            f"--merge needs parts 0..{count - 1} of {count} once each; got parts {indices}"
            f"{f' (missing {missing})' if missing else ''}"
        )

    def settings(meta: dict) -> dict:
        same = ("tokenizer", "dtype", "text_field", "held_out", "seed")
        return {k: meta[k] for k in same} | {"shard_tokens": meta["part"]["shard_tokens"]}

    first = settings(metas[0][1])
    for folder, meta in metas[1:]:
        for key, value in settings(meta).items():
            if value != first[key]:
                raise DataError(
                    f"--merge: part {folder} has {key} {value!r}, part {metas[0][0]} has"
                    f" {first[key]!r}; preprocess every part with the same command"
                )
    return metas


def _shard_arrays(folder: Path, stem: str, dtype: np.dtype):
    tokens = np.memmap(folder / f"{stem}.bin", dtype=dtype, mode="r")
    sentences = np.load(folder / f"{stem}.sentences.npy", allow_pickle=False)
    documents = np.load(folder / f"{stem}.documents.npy", allow_pickle=False)
    return tokens, sentences, documents


def _read_section(report: ReadReport) -> dict:
    return {
        "files": report.files,
        "documents": report.documents,
        "skipped": dict(sorted(report.skipped.items())),
        "first_problem": dict(sorted(report.first_problem.items())),
        "replaced_utf8": report.replaced_utf8,
        "decoded": dict(sorted(report.decoded.items())),
        "ignored_files": report.ignored_files,
    }


def _merged_read(metas: list[dict]) -> dict:
    """What one process reading every part's inputs in order would have reported."""
    report, before = ReadReport(), 0
    for meta in metas:
        read = meta["read"]
        report.files += read["files"]
        report.skipped.update(read["skipped"])
        report.decoded.update(read["decoded"])
        report.replaced_utf8 += read["replaced_utf8"]
        report.ignored_files += read["ignored_files"]
        for reason, where in read["first_problem"].items():
            if reason == "empty_after_tokenization":  # numbered by document within the part
                where = f"document {before + meta['part']['first_empty']}"
            report.first_problem.setdefault(reason, where)
        before += read["documents"]
    report.documents = before
    return _read_section(report)


def _metadata(tokenizer: dict, dtype, text_field, held_out, seed, writers, read) -> dict:
    return {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "dtype": dtype.name,
        "text_field": text_field,
        "held_out": float(held_out),
        "held_out_rule": HELD_OUT_RULE,
        "seed": seed,
        "splits": {name: w.finish() for name, w in writers.items()},
        "read": read,
    }


def _check_splits(metadata: dict) -> None:
    splits, held_out = metadata["splits"], metadata["held_out"]
    if splits["train"]["documents"] == 0:
        raise DataError(
            f"--held-out {held_out:g} leaves none of the documents for training; lower it"
        )
    if held_out > 0 and splits["valid"]["documents"] == 0:
        total = splits["train"]["documents"]
        raise DataError(
            f"--held-out {held_out:g} chose none of the {total} documents; give a larger"
            " fraction or a count (e.g. --held-out 1)"
        )


def _finish(work: Path, metadata: dict, tokenizer_dir: Path, output: Path) -> None:
    (work / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    # The data folder carries its tokenizer: loaders need its pieces (word starts) and
    # checkpoints and exports take it from here.
    shutil.copytree(tokenizer_dir, work / TOKENIZER_DIR)
    _install(work, output)


def _install(shards: Path, output: Path) -> None:
    """Move the finished shards into place; an identical existing output is left as is."""
    if output.is_dir() and any(output.iterdir()):
        if same_folder(shards, output):
            return
        raise DataError(
            f"--output {output} already holds different preprocessed data; choose another"
            " folder or delete it first"
        )
    if output.is_dir():
        output.rmdir()
    os.replace(shards, output)
