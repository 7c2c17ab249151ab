"""The sample index of a split, built once and shared by every rank and loader worker.

Building it is vectorised: each sentence draws the target length of a chunk that would
start there, the end of such a chunk is one `searchsorted` over the cumulative lengths, and
the chunks a document is actually cut into (those reached from its first sentence) are
found by pointer doubling: about log2(chunks per document) passes over the sentences.

The index is an .npy file beside a JSON file holding the key it was built for (index
version, split, seq_length, short_seq_prob, seed, and the identity of the shards: their
metadata, sizes and modification times). It lives in the data folder's `index/`, or, where
that folder is read-only, under ~/.cache/pretrain/index/. One process builds it (a file
lock; other ranks wait, then read), writing both files under temporary names and renaming
them into place, the key last: a half-written index is never found, and an index whose key
differs from the run's is rebuilt, never trusted. Every reader memory-maps it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pretrain.cache import cache_root

INDEX_VERSION = 2
"""Of the chunking below (1: a per-sentence Python loop drawing one target per chunk from
one stream: the same distribution of chunks, but not the same chunks)."""
INDEX_DIR = "index"


def chunk_targets(sentences: int, max_tokens: int, short_seq_prob: float, seed: int) -> np.ndarray:
    """(S,) the target length of a chunk that starts at each sentence: max_tokens, or with
    probability short_seq_prob a uniform draw from 2..max_tokens."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0, 4]))
    target_S = np.full(sentences, max_tokens, dtype=np.int64)
    short_S = rng.random(sentences) < short_seq_prob
    target_S[short_S] = rng.integers(2, max_tokens + 1, size=int(short_S.sum()))
    return target_S


BLOCK = 1 << 20
"""Sentences handled at a time where the whole split need not be: a block's searches stay in
cache, and no float, target or end array of the whole split is made."""


def sop_chunks(
    lengths: np.ndarray,
    doc_offsets: np.ndarray,
    max_tokens: int,
    short_seq_prob: float,
    seed: int,
) -> tuple[np.ndarray, int]:
    """(chunks, too_short): int (K, 3) rows (document, first sentence in it, sentences) of
    runs of whole sentences of one document that reach their target length (max_tokens, or
    with probability short_seq_prob a uniform 2..max_tokens, drawn per chunk), or end the
    document; and how many chunks of one one-token sentence were left out (no pair).

    `lengths`: tokens of every sentence of the split in order, (S,); `doc_offsets`: the
    first sentence of each document, and S, (D + 1,)."""
    cum_S1 = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return chunks_of(cum_S1, doc_offsets, max_tokens, short_seq_prob, seed)


def chunks_of(
    cum_S1: np.ndarray,
    doc_offsets: np.ndarray,
    max_tokens: int,
    short_seq_prob: float,
    seed: int,
) -> tuple[np.ndarray, int]:
    """sop_chunks from the token offset of each sentence of the split, and the end: (S + 1,)."""
    S = len(cum_S1) - 1
    if S == 0:
        return np.zeros((0, 3), dtype=np.int64), 0
    jump = _jumps(cum_S1, doc_offsets, max_tokens, short_seq_prob, seed)
    reached = _reached(jump, doc_offsets[:-1][np.diff(doc_offsets) > 0])
    start_K = np.flatnonzero(reached[:S])
    del reached
    doc_K = np.searchsorted(doc_offsets, start_K, side="right") - 1
    after_K = jump[start_K].astype(np.int64)  # the sink S: the chunk ends its document
    del jump
    after_K = np.where(after_K == S, doc_offsets[doc_K + 1], after_K)
    count_K = after_K - start_K
    keep_K = (count_K >= 2) | (cum_S1[start_K + 1] - cum_S1[start_K] >= 2)
    start_K, count_K, doc_K = start_K[keep_K], count_K[keep_K], doc_K[keep_K]
    rows = np.stack([doc_K, start_K - doc_offsets[doc_K], count_K], axis=1)
    return rows.astype(np.int64), int((~keep_K).sum())


def _jumps(
    cum_S1: np.ndarray, doc_offsets: np.ndarray, max_tokens: int, short_seq_prob: float, seed: int
) -> np.ndarray:
    """(S + 1,) where the walk of chunks goes from a chunk starting at each sentence: the
    sentence after its end, or the sink S where it ends its document (the sink maps to
    itself). A chunk from s ends at the first sentence whose end reaches s's target (the
    draws of chunk_targets, taken a block at a time), or at its document's last sentence."""
    S = len(cum_S1) - 1
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0, 4]))
    short_S = np.empty(S, dtype=bool)
    for a in range(0, S, BLOCK):  # the uniform stream drawn in blocks is the same stream
        short_S[a : a + BLOCK] = rng.random(min(BLOCK, S - a)) < short_seq_prob
    short_values = rng.integers(2, max_tokens + 1, size=int(short_S.sum()))
    jump = np.empty(S + 1, dtype=np.int64 if S >= 2**31 - 1 else np.int32)
    jump[S], taken = S, 0
    for a in range(0, S, BLOCK):
        b = min(a + BLOCK, S)
        target = np.full(b - a, max_tokens, dtype=np.int64)
        short = short_S[a:b]
        count = int(np.count_nonzero(short))
        target[short] = short_values[taken : taken + count]
        taken += count
        # Sentences of a token or more: a chunk ends within max_tokens sentences of its
        # start, so the block searches its own stretch of the offsets only.
        stretch = cum_S1[a : min(b + max_tokens + 1, S + 1)]
        if not np.all(stretch[1:] > stretch[:-1]):
            stretch = cum_S1[a:]
        end = np.searchsorted(stretch, cum_S1[a:b] + target, side="left") + (a - 1)
        doc = np.searchsorted(doc_offsets, np.arange(a, b), side="right") - 1
        last = doc_offsets[doc + 1] - 1
        np.minimum(end, last, out=end)
        jump[a:b] = np.where(end == last, S, end + 1)
    return jump


WALK_PASSES = 1024
"""Passes of the plain walk before _reached turns to pointer doubling."""


def _reached(jump: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """Which nodes the walks node -> jump[node] from `roots` pass through (the last node,
    the sink, maps to itself). The walks advance one jump a pass, all at once, and each
    pass touches only the walks still going: chunks in all plus a pass per chunk of the
    longest document. Documents of more than WALK_PASSES chunks finish by doubling: after
    pass k every node fewer than 2^k jumps away is marked."""
    sink = len(jump) - 1
    reached = np.zeros(len(jump), dtype=bool)
    reached[roots] = True
    front = roots[roots != sink]
    for _ in range(WALK_PASSES):
        front = jump[front]
        front = front[front != sink]
        if len(front) == 0:
            reached[sink] = True
            return reached
        reached[front] = True
    while True:
        marked = np.flatnonzero(reached)
        ahead = jump[marked]
        fresh = ahead[~reached[ahead]]
        if len(fresh) == 0:
            return reached
        reached[fresh] = True
        jump = jump[jump]


def shards_identity(directory: Path, split: str, meta: dict) -> dict:
    """What identifies the shards of a split: their metadata, and each index file's size
    and modification time (a folder preprocessed again reads as other shards)."""
    files = {}
    for entry in meta["splits"][split]["shards"]:
        for ext in (".sentences.npy", ".documents.npy"):
            stat = (directory / f"{entry['name']}{ext}").stat()
            files[entry["name"] + ext] = [stat.st_size, stat.st_mtime_ns]
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return {"metadata_sha256": digest, "files": files}


def _folder(data: Path) -> Path:
    """The data folder's index/ where it can be written, else one under the cache."""
    own = data / INDEX_DIR
    try:
        own.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=own):
            return own
    except OSError:
        where = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:16]
        cached = cache_root() / INDEX_DIR / where
        cached.mkdir(parents=True, exist_ok=True)
        return cached


def shared_index(
    data: Path, name: str, key: dict, build: Callable[[], tuple[np.ndarray, dict]]
) -> tuple[np.ndarray, dict]:
    """The array `build` makes for `key` (and what it said of it), memory-mapped from the
    index folder of `data`; built there first by one process when absent or of another key.
    `name` prefixes the files (the split and sample kind)."""
    key = {"version": INDEX_VERSION, **key}
    stem = f"{name}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"
    folder = _folder(data)
    array_path, key_path = folder / f"{stem}.npy", folder / f"{stem}.json"
    found = _read(array_path, key_path, key)
    if found is not None:
        return found
    with (folder / f"{stem}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be building it: wait for it
        found = _read(array_path, key_path, key)
        if found is None:
            array, info = build()
            _write(folder, array_path, key_path, array, {"key": key, "info": info})
            found = _read(array_path, key_path, key)
    if found is None:
        raise OSError(f"the sample index {array_path} did not read back after writing it")
    return found


def _read(array_path: Path, key_path: Path, key: dict) -> tuple[np.ndarray, dict] | None:
    try:
        written = json.loads(key_path.read_text())
        if written.get("key") != key:
            return None
        return np.load(array_path, mmap_mode="r", allow_pickle=False), written["info"]
    except (OSError, ValueError, KeyError, AttributeError):
        return None  # absent, half-written or not ours: built again


def _write(folder: Path, array_path: Path, key_path: Path, array: np.ndarray, meta: dict) -> None:
    """Both files under temporary names, renamed into place: the array, then its key."""
    for path, write in (
        (array_path, lambda f: np.save(f, array, allow_pickle=False)),
        (key_path, lambda f: f.write(json.dumps(meta, indent=1).encode())),
    ):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
