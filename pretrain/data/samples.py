"""Training samples cut from token shards: ALBERT segment pairs and packed causal windows.

Both are indexable: sample i is built on demand from a small index, with its randomness
drawn from a generator the caller derives from (seed, global position), so that any sample
can be rebuilt exactly wherever a run resumes.
"""

from __future__ import annotations

import numpy as np

from pretrain.data.index import shards_identity, shared_index, sop_chunks
from pretrain.data.shards import TokenShards


def _truncate_pair(
    a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """ALBERT's truncate_seq_pair: drop one token at a time from the longer segment, from
    the front or the back with equal probability."""
    a_lo, a_hi, b_lo, b_hi = 0, len(a), 0, len(b)
    excess = len(a) + len(b) - max_tokens
    if excess > 0:
        from_front = rng.random(excess) < 0.5
        for front in from_front:
            if a_hi - a_lo > b_hi - b_lo:
                a_lo, a_hi = (a_lo + 1, a_hi) if front else (a_lo, a_hi - 1)
            else:
                b_lo, b_hi = (b_lo + 1, b_hi) if front else (b_lo, b_hi - 1)
    return a[a_lo:a_hi], b[b_lo:b_hi]


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
            lengths, doc_offsets = shards.sentence_table()
            rows, too_short = sop_chunks(
                lengths, doc_offsets, self.max_tokens, short_seq_prob, seed
            )
            return rows, {"too_short": too_short}

        self.index, info = shared_index(shards.directory, f"{shards.split}-sop", key, build)
        """(doc, first sentence, sentences) of each chunk, memory-mapped."""
        self.too_short: int = info["too_short"]
        """Chunks of a single one-token sentence, which cannot make a pair (counted)."""

    def __len__(self) -> int:
        return len(self.index)

    def build(self, sample: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        doc, first, count = (int(v) for v in self.index[sample])
        sentences = self.shards.sentences(doc, first, count)
        if count >= 2:
            cut = int(rng.integers(1, count))
            a, b = np.concatenate(sentences[:cut]), np.concatenate(sentences[cut:])
        else:
            tokens = sentences[0]
            cut = int(rng.integers(1, len(tokens)))
            a, b = tokens[:cut], tokens[cut:]
        swapped = bool(rng.random() < 0.5)
        if swapped:
            a, b = b, a
        a, b = _truncate_pair(a, b, self.max_tokens, rng)
        return self._assemble(a, b, swapped)

    def _assemble(self, a: np.ndarray, b: np.ndarray, swapped: bool) -> dict[str, np.ndarray]:
        T, n_a, n_b = self.seq_length, len(a), len(b)
        input_ids = np.full(T, self.pad, dtype=np.int64)
        input_ids[0] = self.cls
        input_ids[1 : 1 + n_a] = a
        input_ids[1 + n_a] = self.sep
        input_ids[2 + n_a : 2 + n_a + n_b] = b
        input_ids[2 + n_a + n_b] = self.sep
        used = 3 + n_a + n_b
        token_type_ids = np.zeros(T, dtype=np.int64)
        token_type_ids[2 + n_a : used] = 1
        attention_mask = np.zeros(T, dtype=np.int64)
        attention_mask[:used] = 1
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "sop_labels": np.int64(swapped),
        }


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
