"""Read-only access to the token shards of one split, validated against their index."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.data.preprocess import FORMAT, METADATA
from pretrain.data.sources import DataError


@dataclass(frozen=True)
class _Shard:
    tokens: np.ndarray  # (N,), memory-mapped
    sentences: np.ndarray  # (S+1,) token offsets
    documents: np.ndarray  # (D+1,) sentence offsets


def read_metadata(directory: str | Path) -> dict:
    path = Path(directory) / METADATA
    if not path.is_file():
        raise DataError(
            f"{directory} holds no preprocessed shards ({METADATA} missing);"
            " run tools/preprocess.py first"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _load_index(path: Path) -> np.ndarray:
    """A shard index, memory-mapped; never unpickled."""
    try:
        index = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(
            f"shard index {path} is unreadable ({str(err).splitlines()[0][:120]}); preprocess again"
        ) from None
    if index.ndim != 1 or index.dtype.kind not in "iu" or len(index) == 0:
        raise DataError(f"shard index {path} is not an index of offsets; preprocess again")
    return index


class TokenShards:
    """The documents of one split. Document d has sentences, each a token array; all
    addressing goes through the per-shard indexes, nothing is loaded eagerly."""

    def __init__(
        self, directory: str | Path, split: str = "train", tokenizer_checksum: str | None = None
    ) -> None:
        self.directory = Path(directory)
        self.meta = read_metadata(directory)
        if (
            tokenizer_checksum is not None
            and self.meta["tokenizer"]["checksum"] != tokenizer_checksum
        ):
            raise DataError(
                f"shards in {directory} were tokenized with another tokenizer (checksum"
                f" {self.meta['tokenizer']['checksum'][:12]}..., this run's is"
                f" {tokenizer_checksum[:12]}...); preprocess again with the run's tokenizer"
            )
        if split not in self.meta["splits"]:
            raise DataError(
                f"{directory} has no {split!r} split (it has {', '.join(self.meta['splits'])});"
                " preprocess with --held-out to make a valid split"
            )
        self.split = split
        self.dtype = np.dtype(self.meta["dtype"])
        self.special_ids: dict[str, int] = self.meta["tokenizer"]["special_ids"]
        self.vocab_size: int = self.meta["tokenizer"]["vocab_size"]
        self._shards = [self._open(s) for s in self.meta["splits"][split]["shards"]]
        docs = [len(s.documents) - 1 for s in self._shards]
        self._doc_start = np.concatenate([[0], np.cumsum(docs)]).astype(np.int64)

    def _open(self, entry: dict) -> _Shard:
        stem = self.directory / entry["name"]
        paths = [Path(f"{stem}{ext}") for ext in (".bin", ".sentences.npy", ".documents.npy")]
        for path in paths:
            if not path.is_file():
                raise DataError(f"shard file {path} is missing; preprocess again")
        sentences, documents = _load_index(paths[1]), _load_index(paths[2])
        expected = int(sentences[-1]) * self.dtype.itemsize
        actual = paths[0].stat().st_size
        if actual != expected or len(documents) - 1 != entry["documents"]:
            raise DataError(
                f"shard {paths[0]} holds {actual} bytes but its index says {expected}"
                " (truncated or replaced); preprocess again"
            )
        tokens = (
            np.memmap(paths[0], dtype=self.dtype, mode="r") if actual else np.zeros(0, self.dtype)
        )
        # Plain ndarray views of the maps (the map stays open as their base): slicing a
        # np.memmap costs several times more, and a sample takes several slices.
        return _Shard(np.asarray(tokens), np.asarray(sentences), np.asarray(documents))

    @property
    def num_documents(self) -> int:
        return int(self._doc_start[-1])

    def _locate(self, doc: int) -> tuple[_Shard, int]:
        k = int(np.searchsorted(self._doc_start, doc, side="right")) - 1
        return self._shards[k], doc - int(self._doc_start[k])

    def sentence_lengths(self, doc: int) -> np.ndarray:
        shard, local = self._locate(doc)
        first, last = shard.documents[local], shard.documents[local + 1]
        return np.diff(shard.sentences[first : last + 1])

    def chunk(self, doc: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The tokens of sentences [first, first + count) of document `doc` (one slice: a
        document's sentences lie end to end), and (count + 1,) where each begins in it."""
        shard, local = self._locate(doc)
        base = int(shard.documents[local]) + first
        offsets = shard.sentences[base : base + count + 1]
        start = int(offsets[0])
        return shard.tokens[start : int(offsets[-1])], offsets - start

    def sentences(self, doc: int, first: int, count: int) -> list[np.ndarray]:
        """Token arrays of sentences [first, first + count) of document `doc`."""
        tokens, offsets = self.chunk(doc, first, count)
        return [tokens[offsets[i] : offsets[i + 1]] for i in range(count)]

    def document_tokens(self, doc: int) -> np.ndarray:
        shard, local = self._locate(doc)
        first, last = shard.documents[local], shard.documents[local + 1]
        return shard.tokens[shard.sentences[first] : shard.sentences[last]]

    def sentence_offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 (S + 1,) token offset of every sentence across all shards as if they were
        one, then the end; and (D + 1,) the first sentence of each document (then S)."""
        S = sum(len(shard.sentences) - 1 for shard in self._shards)
        cum_S1 = np.zeros(S + 1, dtype=np.int64)
        starts, base, tokens = [], 0, 0
        for shard in self._shards:
            offsets = shard.sentences
            count = len(offsets) - 1
            np.add(offsets[1:], tokens - int(offsets[0]), out=cum_S1[base + 1 : base + 1 + count])
            starts.append(np.asarray(shard.documents[:-1], dtype=np.int64) + base)
            base, tokens = base + count, int(cum_S1[base + count])
        return cum_S1, np.concatenate([*starts, [base]]).astype(np.int64)

    def document_lengths(self) -> np.ndarray:
        """int64 (D,) tokens per document, across all shards."""
        lengths = [np.diff(np.asarray(s.sentences)[np.asarray(s.documents)]) for s in self._shards]
        return np.concatenate(lengths).astype(np.int64)
