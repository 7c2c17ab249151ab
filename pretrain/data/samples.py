"""Training samples cut from token shards: ALBERT segment pairs and packed causal windows.

Both are indexable: sample i is built on demand from a small index, with its randomness
drawn from a generator the caller derives from (seed, global position), so that any sample
can be rebuilt exactly wherever a run resumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from pretrain.data.index import chunks_of, shards_identity, shared_index
from pretrain.data.shards import TokenShards


def _truncate_pair(
    a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """ALBERT's truncate_seq_pair: drop one token at a time from the longer segment (b on
    a tie), from the front or the back with equal probability."""
    excess = len(a) + len(b) - max_tokens
    if excess <= 0:
        return a, b
    from_front_X = rng.random(excess) < 0.5
    on_a_X = _trimmed_from_a(len(a), len(b), excess)
    a_front, b_front = int(from_front_X[on_a_X].sum()), int(from_front_X[~on_a_X].sum())
    a_cut = int(on_a_X.sum())
    b_cut = excess - a_cut
    return a[a_front : len(a) - (a_cut - a_front)], b[b_front : len(b) - (b_cut - b_front)]


def _trimmed_from_a(len_a: int, len_b: int, excess: int) -> np.ndarray:
    """bool (excess,): which of the drops fall on a. The longer one loses tokens until the
    two are within one of each other; from there the drops alternate."""
    if len_a > len_b:
        lead, a_first = min(len_a - len_b, excess), True  # a shrinks to b's length
    else:
        lead, a_first = min(len_b - len_a + 1, excess), False  # b shrinks below a's
    after_X = np.arange(excess - lead) % 2 == (1 if a_first else 0)
    return np.concatenate((np.full(lead, a_first), after_X))


class SOPSamples:
    """[CLS] A [SEP] B [SEP] from consecutive text of one document, ALBERT style.

    The index is a list of chunks: runs of whole sentences of one document that reach a
    target length (seq_length - 3, or with probability short_seq_prob a random shorter
    one, redrawn per chunk), built once per data folder and key and shared
    (pretrain.data.index). At build time a chunk is split into A and B at a random
    sentence boundary (inside the sentence when the chunk is one sentence), and with
    probability 0.5 the two are swapped: the sentence-order label is 1 when swapped.
    """

    def __init__(
        self, shards: TokenShards, seq_length: int, short_seq_prob: float, seed: int
    ) -> None:
        self.shards, self.seq_length = shards, seq_length
        self.max_tokens = seq_length - 3
        ids = shards.special_ids
        self.cls, self.sep, self.pad = ids["cls"], ids["sep"], ids["pad"]
        key = {
            "kind": "sop",
            "split": shards.split,
            "seq_length": seq_length,
            "short_seq_prob": short_seq_prob,
            "seed": seed,
            "shards": shards_identity(shards.directory, shards.split, shards.meta),
        }

        def build() -> tuple[np.ndarray, dict]:
            cum_S1, doc_offsets = shards.sentence_offsets()
            rows, too_short = chunks_of(cum_S1, doc_offsets, self.max_tokens, short_seq_prob, seed)
            return rows, {"too_short": too_short}

        self.index, info = shared_index(shards.directory, f"{shards.split}-sop", key, build)
        """(doc, first sentence, sentences) of each chunk, memory-mapped."""
        self.too_short: int = info["too_short"]
        """Chunks of a single one-token sentence, which cannot make a pair (counted)."""

    def __len__(self) -> int:
        return len(self.index)

    def build(self, sample: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.build_batch([sample], [rng]).items()}

    def build_batch(
        self, samples: Sequence[int], rngs: Iterable[np.random.Generator]
    ) -> dict[str, np.ndarray]:
        """Samples as (B, T) arrays (sop_labels (B,)), sample b built with the b-th
        generator of `rngs`."""
        B, T = len(samples), self.seq_length
        input_ids_BT = np.full((B, T), self.pad, dtype=np.int64)
        input_ids_BT[:, 0] = self.cls
        len_a_B, len_b_B = np.zeros(B, dtype=np.int64), np.zeros(B, dtype=np.int64)
        swapped_B = np.zeros(B, dtype=np.int64)
        for i, (sample, rng) in enumerate(zip(samples, rngs, strict=True)):
            a, b, swapped_B[i] = self._segments(int(sample), rng)
            n_a, n_b = len(a), len(b)
            len_a_B[i], len_b_B[i] = n_a, n_b
            row = input_ids_BT[i]
            row[1 : 1 + n_a] = a
            row[1 + n_a] = self.sep
            row[2 + n_a : 2 + n_a + n_b] = b
            row[2 + n_a + n_b] = self.sep
        t_T = np.arange(T)
        used_B = 3 + len_a_B + len_b_B
        return {
            "input_ids": input_ids_BT,
            "token_type_ids": ((t_T >= 2 + len_a_B[:, None]) & (t_T < used_B[:, None])).astype(
                np.int64
            ),
            "attention_mask": (t_T < used_B[:, None]).astype(np.int64),
            "sop_labels": swapped_B,
        }

    def _segments(
        self, sample: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Segments A and B of a sample, truncated to fit, and whether they were swapped."""
        doc, first, count = (int(v) for v in self.index[sample])
        tokens, offsets = self.shards.chunk(doc, first, count)
        if count >= 2:
            cut = int(offsets[int(rng.integers(1, count))])
        else:
            cut = int(rng.integers(1, len(tokens)))
        a, b = tokens[:cut], tokens[cut:]
        swapped = bool(rng.random() < 0.5)
        if swapped:
            a, b = b, a
        a, b = _truncate_pair(a, b, self.max_tokens, rng)
        return a, b, swapped


class CausalSamples:
    """Packed windows over the documents in order, each followed by EOS: sample i is
    stream[i*T : i*T + T] with next-token labels stream[i*T + 1 : i*T + T + 1].
    Attention runs across document boundaries, as in GPT-style packing."""

    def __init__(self, shards: TokenShards, seq_length: int) -> None:
        self.shards, self.seq_length = shards, seq_length
        self.eos = shards.special_ids["eos"]
        self.lengths = shards.document_lengths() + 1  # + EOS
        self.doc_end = np.cumsum(self.lengths)

    def __len__(self) -> int:
        return int((self.doc_end[-1] - 1) // self.seq_length)

    def _stream(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        doc = int(np.searchsorted(self.doc_end, start, side="right"))
        pos = start
        while pos < stop:
            doc_start = int(self.doc_end[doc] - self.lengths[doc])
            tokens = self.shards.document_tokens(doc)
            lo, hi = pos - doc_start, min(stop - doc_start, len(tokens) + 1)
            pieces.append(tokens[lo : min(hi, len(tokens))].astype(np.int64))
            if hi == len(tokens) + 1:
                pieces.append(np.array([self.eos], dtype=np.int64))
            pos, doc = doc_start + hi, doc + 1
        return np.concatenate(pieces)

    def build(self, sample: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        start = sample * self.seq_length
        stream = self._stream(start, start + self.seq_length + 1)
        return {"input_ids": stream[:-1], "labels": stream[1:]}

    def build_batch(self, samples: Sequence[int], rngs=None) -> dict[str, np.ndarray]:
        """Samples as (B, T) arrays (they draw nothing at random: `rngs` is unused)."""
        rows = [self.build(int(sample)) for sample in samples]
        return {k: np.stack([row[k] for row in rows]) for k in ("input_ids", "labels")}
