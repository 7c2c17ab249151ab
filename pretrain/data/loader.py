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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from pretrain.config import Config
from pretrain.data.index import shared_index
from pretrain.data.masking import MaskingSpec, mask_batch
from pretrain.data.preprocess import TOKENIZER_DIR
from pretrain.data.samples import CausalSamples, SOPSamples
from pretrain.data.seeding import generators
from pretrain.data.shards import TokenShards
from pretrain.data.sources import DataError
from pretrain.data.tokenizer import Tokenizer


def sample_rng(seed: int, position: int) -> np.random.Generator:
    """Randomness of building the sample at `position` (segment split, swap, truncation);
    masking uses its own stream, `masking_rng(seed, position)`."""
    return np.random.default_rng(np.random.SeedSequence([seed, position, 1]))


class EpochOrder:
    """Global position -> sample index: a seeded permutation per epoch. With `shared`
    (a data folder), each epoch's permutation is built once, kept beside the sample index
    and memory-mapped (pretrain.data.index), so no rank holds an array of its own."""

    def __init__(self, num_samples: int, seed: int, shared: SharedOrder | None = None) -> None:
        if num_samples == 0:
            raise DataError("the data yields no samples; use more text or a shorter seq_length")
        self.num_samples, self.seed, self.shared = num_samples, seed, shared
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _draw(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 2]))
        return rng.permutation(self.num_samples)

    def __call__(self, position: int) -> int:
        epoch, k = divmod(position, self.num_samples)
        if epoch != self._epoch:
            if self.shared is None:
                perm = self._draw(epoch)
            else:
                key = {"kind": "order", "samples": self.num_samples, "seed": self.seed}
                name = f"{self.shared.name}-order{epoch}"
                perm, _ = shared_index(
                    self.shared.data, name, {**key, "epoch": epoch}, lambda: (self._draw(epoch), {})
                )
            self._epoch, self._perm = epoch, perm
        return int(self._perm[k])


@dataclass(frozen=True)
class SharedOrder:
    """Where an epoch order keeps its permutations: the data folder, and the split's name."""

    data: Path
    name: str


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
        self.order = EpochOrder(len(self.samples), self.seed, SharedOrder(data, split))

    def __len__(self) -> int:
        """Samples per epoch."""
        return len(self.samples)

    def __getitem__(self, position: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.__getitems__([position]).items()}

    def __getitems__(self, positions: Sequence[int]) -> dict[str, np.ndarray]:
        """A micro-batch of global positions as (B, ...) arrays (the DataLoader hands the
        whole batch here, and `collate` turns it into tensors). Each sample is what
        `sample_rng` and `masking_rng` of its position make of it; their generators are
        seeded for the batch at once (pretrain.data.seeding)."""
        positions_B = np.asarray(positions, dtype=np.int64)
        samples_B = [self.order(int(p)) for p in positions_B]
        seed_B = np.full(len(positions_B), self.seed, dtype=np.int64)
        batch = self.samples.build_batch(
            samples_B, generators(np.stack([seed_B, positions_B, np.ones_like(seed_B)], axis=1))
        )
        if self.causal:
            return batch
        input_ids_BT = batch["input_ids"]
        batch["input_ids"], batch["mlm_labels"] = mask_batch(
            input_ids_BT,
            self.word_start[input_ids_BT],
            self.masking,
            generators(np.stack([seed_B, positions_B], axis=1)),
        )
        return batch


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


def collate(
    samples: list[dict[str, np.ndarray]] | dict[str, np.ndarray],
) -> dict[str, torch.Tensor]:
    """Tensors of a batch: samples stacked, or a batch `PretrainDataset.__getitems__`
    already stacked. A batch without padding carries no attention mask: attention then
    runs unmasked, which GPUs serve with the flash kernel (it takes no mask). Deciding
    here, on the host, costs the step no device sync."""
    if isinstance(samples, dict):
        batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in samples.items()}
    else:
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


def loader_workers(requested: int | None, device: torch.device) -> int:
    """data.num_workers as it runs on `device`: the configured count, or by default one
    worker beside a GPU and none on a CPU, where its batches would be built on the cores
    the ranks compute on (in process, a batch costs its build time and no transfer)."""
    if requested is not None:
        return requested
    return 0 if device.type == "cpu" else 1


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
