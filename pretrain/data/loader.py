"""Deterministic, rank-aware, resumable batches.

A run consumes one global stream of sample positions 0, 1, 2, ...: position p is sample
`order(p)` of epoch p // N (a fresh permutation per epoch, from the seed), built and
masked with randomness derived from (seed, p). Each micro-step takes the next
micro_batch_size * world_size positions and rank r takes its contiguous slice. The
loader's whole state is the number of consumed samples: a resumed run, with the same or a
different number of ranks, sees the same samples at the same positions.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from pretrain.config import Config
from pretrain.data.masking import MaskingSpec, mask_tokens, masking_rng
from pretrain.data.preprocess import TOKENIZER_DIR
from pretrain.data.samples import CausalSamples, SOPSamples
from pretrain.data.shards import TokenShards
from pretrain.data.sources import DataError
from pretrain.data.tokenizer import Tokenizer


def sample_rng(seed: int, position: int) -> np.random.Generator:
    """Randomness of building the sample at `position` (segment split, swap, truncation);
    masking uses its own stream, `masking_rng(seed, position)`."""
    return np.random.default_rng(np.random.SeedSequence([seed, position, 1]))


_M64 = (1 << 64) - 1


def _mix(x: int, key: int) -> int:
    """A 64-bit hash of `x` under `key` (splitmix64's finaliser)."""
    z = (x + key * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class EpochOrder:
    """Global position -> sample index: a seeded permutation per epoch, computed per
    position rather than held (O(1) memory at any corpus size). Each epoch's permutation is
    a Feistel network over [0, 4^h), 4^h >= the number of samples, walked until it lands
    inside [0, N) (a bijection of [0, N): at most a few steps, since 4^h < 4N)."""

    ROUNDS = 6

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples == 0:
            raise DataError("the data yields no samples; use more text or a shorter seq_length")
        self.num_samples, self.seed = num_samples, seed
        self.half = max(1, ((num_samples - 1).bit_length() + 1) // 2)
        self._epoch, self._keys = -1, ()

    def _round_keys(self, epoch: int) -> tuple[int, ...]:
        if epoch != self._epoch:
            state = np.random.SeedSequence([self.seed, epoch, 2]).generate_state(
                self.ROUNDS, np.uint64
            )
            self._epoch, self._keys = epoch, tuple(int(k) for k in state)
        return self._keys

    def __call__(self, position: int) -> int:
        epoch, x = divmod(position, self.num_samples)
        keys, half = self._round_keys(epoch), self.half
        mask = (1 << half) - 1
        while True:
            left, right = x >> half, x & mask
            for key in keys:
                left, right = right, left ^ (_mix(right, key) & mask)
            x = (left << half) | right
            if x < self.num_samples:
                return x


class PretrainDataset(Dataset):
    """Map-style dataset indexed by global position (not by sample)."""

    def __init__(self, cfg: Config, split: str = "train", tokenizer_checksum: str | None = None):
        data = Path(cfg.data.path)
        self.tokenizer = Tokenizer(Path(cfg.data.tokenizer or data / TOKENIZER_DIR))
        self.shards = TokenShards(data, split, tokenizer_checksum or self.tokenizer.info.checksum)
        if self.shards.vocab_size > cfg.model.vocab_size:
            raise DataError(
                f"the shards' vocabulary ({self.shards.vocab_size}) exceeds model.vocab_size"
                f" ({cfg.model.vocab_size}); set model.vocab_size={self.shards.vocab_size}"
            )
        self.seed, self.causal = cfg.train.seed, cfg.model.causal
        if self.causal:
            self.samples = CausalSamples(self.shards, cfg.data.seq_length)
        else:
            self.samples = SOPSamples(
                self.shards, cfg.data.seq_length, cfg.data.short_seq_prob, cfg.train.seed
            )
            ids = self.shards.special_ids
            o = cfg.objective
            self.masking = MaskingSpec(
                mask_prob=o.mask_prob,
                max_predictions=o.max_predictions,
                max_ngram=o.max_ngram,
                whole_word=o.whole_word,
                mask_id=ids["mask"],
                vocab_size=self.shards.vocab_size,
                special_ids=frozenset(ids.values()),
            )
            self.word_start = self.tokenizer.word_start
        self.order = EpochOrder(len(self.samples), self.seed)

    def __len__(self) -> int:
        """Samples per epoch."""
        return len(self.samples)

    def __getitem__(self, position: int) -> dict[str, np.ndarray]:
        sample = self.samples.build(self.order(position), sample_rng(self.seed, position))
        if self.causal:
            return sample
        masked = mask_tokens(
            sample["input_ids"],
            self.word_start[sample["input_ids"]],
            self.masking,
            masking_rng(self.seed, position),
        )
        sample["input_ids"], sample["mlm_labels"] = masked.input_ids, masked.labels
        return sample


class RankBatchSampler(Sampler[list[int]]):
    """Endless micro-batches of global positions for one rank, from `consumed` on."""

    def __init__(self, consumed: int, micro_batch_size: int, rank: int, world_size: int) -> None:
        self.consumed, self.micro, self.rank, self.world = (
            consumed,
            micro_batch_size,
            rank,
            world_size,
        )

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed + self.rank * self.micro
        while True:
            yield list(range(start, start + self.micro))
            start += self.micro * self.world


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch. A batch without padding carries no attention mask:
    attention then runs unmasked, which GPUs serve with the flash kernel (it takes no
    mask). Deciding here, on the host, costs the step no device sync."""
    batch = default_collate(samples)
    mask = batch.get("attention_mask")
    if mask is not None and bool(mask.all()):
        del batch["attention_mask"]
    return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to their rank, which saves a checkpoint and then shuts
    them down; SLURM and our launcher signal every process, workers included."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(
    dataset: PretrainDataset,
    consumed: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """Micro-batches for `rank`, starting after `consumed` samples of the global stream."""
    sampler = RankBatchSampler(consumed, micro_batch_size, rank, world_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=_ignore_stop_signals,
        persistent_workers=num_workers > 0,
    )
