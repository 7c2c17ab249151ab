"""Samples and batches: SOP pairs, causal windows, deterministic order, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import REPO

from pretrain.config import load_config
from pretrain.data.loader import PretrainDataset, make_loader, sample_rng
from pretrain.data.masking import IGNORE_INDEX, mask_tokens, masking_rng
from pretrain.data.samples import CausalSamples, SOPSamples, _truncate_pair
from pretrain.data.shards import TokenShards

pytestmark = pytest.mark.unit


def config(shards_dir, family="albert", **overrides):
    name = "tiny-albert.yaml" if family == "albert" else "tiny-llama.yaml"
    return load_config(
        REPO / "configs" / name,
        {"data.path": str(shards_dir), "data.seq_length": 48, **overrides},
    )


def starts(haystack: np.ndarray, needle: np.ndarray) -> np.ndarray:
    """Every start of `needle` in `haystack`."""
    windows = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
    return np.flatnonzero((windows == needle).all(axis=1))


def consecutive(doc: np.ndarray, first: np.ndarray, second: np.ndarray, max_gap: int) -> bool:
    """Does `second` follow some occurrence of `first` in `doc`, at most `max_gap` tokens
    later (the tokens truncation removed at the joint)?"""
    second_starts = starts(doc, second)
    for start in starts(doc, first):
        gaps = second_starts - (start + len(first))
        if ((gaps >= 0) & (gaps <= max_gap)).any():
            return True
    return False


def split_pair(sample, cls=4, sep=5):
    ids = sample["input_ids"][sample["attention_mask"] == 1]
    assert ids[0] == cls and ids[-1] == sep
    middle = int(np.flatnonzero(ids == sep)[0])
    return ids[1:middle], ids[middle + 1 : -1]


def test_sop_segments_are_consecutive_text_of_one_document(shards_dir):
    shards = TokenShards(shards_dir)
    samples = SOPSamples(shards, seq_length=48, short_seq_prob=0.1, seed=0)
    labels = []
    for i in range(0, len(samples), max(1, len(samples) // 300)):
        sample = samples.build(i, sample_rng(0, i))
        a, b = split_pair(sample)
        assert len(a) and len(b) and len(a) + len(b) <= 45
        # Token types: 0 for [CLS] A [SEP], 1 for B [SEP], padding 0.
        types = sample["token_type_ids"]
        assert types[: len(a) + 2].sum() == 0 and types[len(a) + 2 : len(a) + len(b) + 3].all()
        doc = shards.document_tokens(int(samples.index[i, 0]))
        first, second = (b, a) if sample["sop_labels"] else (a, b)
        assert consecutive(doc, first, second, max_gap=48), i
        labels.append(int(sample["sop_labels"]))
    assert len(labels) >= 200
    assert abs(np.mean(labels) - 0.5) < 0.1


def test_sop_labels_balanced_over_the_loader(shards_dir):
    dataset = PretrainDataset(config(shards_dir))
    labels = torch.cat(
        [next(iter(make_loader(dataset, c, 64)))["sop_labels"] for c in (0, 64, 128)]
    )
    assert abs(labels.float().mean().item() - 0.5) < 0.1


def test_short_sequences_appear_with_short_seq_prob(shards_dir):
    shards = TokenShards(shards_dir)
    short = SOPSamples(shards, seq_length=48, short_seq_prob=0.5, seed=0)
    never = SOPSamples(shards, seq_length=48, short_seq_prob=0.0, seed=0)
    assert len(short) > len(never)  # shorter targets cut more chunks


def test_causal_windows_tile_the_stream_with_eos(shards_dir):
    shards = TokenShards(shards_dir)
    samples = CausalSamples(shards, seq_length=32)
    eos = shards.special_ids["eos"]
    stream = np.concatenate(
        [np.append(shards.document_tokens(d), eos) for d in range(shards.num_documents)]
    )
    assert len(samples) == (len(stream) - 1) // 32
    for i in (0, 1, len(samples) // 2, len(samples) - 1):
        sample = samples.build(i)
        np.testing.assert_array_equal(sample["input_ids"], stream[i * 32 : i * 32 + 32])
        np.testing.assert_array_equal(sample["labels"], stream[i * 32 + 1 : i * 32 + 33])
    assert (stream == eos).sum() == shards.num_documents


def batches(dataset, consumed, micro, rank, world, steps, workers=0):
    """Micro-batches as the loader gives them, with the attention mask a batch without
    padding leaves out put back as ones, so that batches compare across rank layouts."""
    loader = iter(make_loader(dataset, consumed, micro, rank, world, num_workers=workers))
    out = [next(loader) for _ in range(steps)]
    if not dataset.causal:
        for b in out:
            b.setdefault("attention_mask", torch.ones_like(b["input_ids"]))
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["albert", "llama"])
def test_same_seed_same_batches_other_seed_other_batches(shards_dir, family):
    a = batches(PretrainDataset(config(shards_dir, family)), 0, 8, 0, 1, 3)
    b = batches(PretrainDataset(config(shards_dir, family)), 0, 8, 0, 1, 3)
    c = batches(PretrainDataset(config(shards_dir, family, **{"train.seed": 7})), 0, 8, 0, 1, 3)
    for x, y in zip(a, b, strict=True):
        assert_same(x, y)
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])


def join_ranks(per_rank):
    """Concatenate the ranks' micro-batches of each step: the global batch in order."""
    return [
        {k: torch.cat([r[step][k] for r in per_rank]) for k in per_rank[0][step]}
        for step in range(len(per_rank[0]))
    ]


@pytest.mark.parametrize("family", ["albert", "llama"])
def test_resume_and_rank_count_do_not_change_the_samples(shards_dir, family):
    dataset = PretrainDataset(config(shards_dir, family))
    straight = batches(dataset, 0, 8, 0, 1, 6)  # 1 rank, 6 steps of 8
    # 2 ranks of 4 for 3 steps, "crash", resume at consumed=24 with 2 ranks.
    two_ranks = join_ranks([batches(dataset, 0, 4, r, 2, 3) for r in (0, 1)])
    two_ranks += join_ranks([batches(dataset, 24, 4, r, 2, 3) for r in (0, 1)])
    # 2 ranks for 3 steps, resume with 1 rank of 8 (same global batch).
    mixed = join_ranks([batches(dataset, 0, 4, r, 2, 3) for r in (0, 1)])
    mixed += batches(dataset, 24, 8, 0, 1, 3)
    for step in range(6):
        assert_same(two_ranks[step], straight[step])
        assert_same(mixed[step], straight[step])


def test_worker_processes_give_the_same_batches(shards_dir):
    dataset = PretrainDataset(config(shards_dir))
    inline = batches(dataset, 16, 8, 1, 2, 4)
    workers = batches(dataset, 16, 8, 1, 2, 4, workers=2)
    for x, y in zip(inline, workers, strict=True):
        assert_same(x, y)


def test_epochs_reshuffle_and_remask(shards_dir):
    dataset = PretrainDataset(config(shards_dir))
    n = len(dataset)
    first = dataset.order
    order_0 = [first(p) for p in range(n)]
    order_1 = [first(p) for p in range(n, 2 * n)]
    assert sorted(order_0) == sorted(order_1) == list(range(n))
    assert order_0 != order_1
    # The same underlying sample in the next epoch is masked afresh.
    p0 = 0
    p1 = n + order_1.index(order_0[0])
    assert not np.array_equal(dataset[p0]["mlm_labels"], dataset[p1]["mlm_labels"])


def test_mlm_batches_mask_only_real_tokens(shards_dir):
    batch = next(iter(make_loader(PretrainDataset(config(shards_dir)), 0, 32)))
    labels, ids = batch["mlm_labels"], batch["input_ids"]
    predicted = labels != IGNORE_INDEX
    assert predicted.any(dim=1).all()
    assert (predicted.sum(dim=1) <= 10).all()  # tiny-albert's max_predictions
    special = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    assert not torch.isin(labels[predicted], special).any()
    mask = batch.get("attention_mask", torch.ones_like(ids))  # absent: no padding
    assert (mask[predicted] == 1).all()
    assert (ids[predicted] == 6).float().mean() > 0.6  # most become [MASK]


def test_vocab_larger_than_model_is_refused(shards_dir):
    from pretrain.data.sources import DataError

    with pytest.raises(DataError, match=r"set model.vocab_size=150"):
        PretrainDataset(config(shards_dir, **{"model.vocab_size": 100}))


def test_no_valid_split_is_named(shards_dir, tmp_path, corpus_dir, tokenizer_dir):
    from pretrain.data.preprocess import preprocess
    from pretrain.data.sources import DataError

    out = tmp_path / "data"
    preprocess([str(corpus_dir)], tokenizer_dir, out)
    with pytest.raises(DataError, match="has no 'valid' split"):
        PretrainDataset(config(out), split="valid")
    assert len(PretrainDataset(config(shards_dir), split="valid")) > 0


def truncate_one_at_a_time(a, b, max_tokens, rng):
    """ALBERT's truncate_seq_pair as written there: one token a step."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
    return a, b


def test_truncation_drops_what_the_one_token_loop_drops():
    rng = np.random.default_rng(0)
    for _ in range(500):
        len_a, len_b = (int(n) for n in rng.integers(1, 60, size=2))
        max_tokens = int(rng.integers(2, 120))
        a, b = np.arange(len_a), 100 + np.arange(len_b)
        seed = int(rng.integers(1 << 30))
        got = _truncate_pair(a, b, max_tokens, np.random.default_rng(seed))
        # The loop draws one uniform a step, as the batch of `excess` uniforms does.
        expected = truncate_one_at_a_time(a, b, max_tokens, np.random.default_rng(seed))
        assert [g.tolist() for g in got] == list(expected), (len_a, len_b, max_tokens)


@pytest.mark.parametrize("family", ["albert", "llama"])
def test_a_batch_holds_the_samples_of_its_positions(shards_dir, family):
    """__getitems__ (the loader's path, generators seeded for the whole batch) against
    each position built alone with NumPy's own generators."""
    dataset = PretrainDataset(config(shards_dir, family))
    positions = [3, 4, 90, len(dataset) + 2, 5 * len(dataset) + 11]
    batch = dataset.__getitems__(positions)
    seed = dataset.seed
    for b, position in enumerate(positions):
        alone = dataset.samples.build(dataset.order(position), sample_rng(seed, position))
        if not dataset.causal:
            masked = mask_tokens(
                alone["input_ids"],
                dataset.word_start[alone["input_ids"]],
                dataset.masking,
                masking_rng(seed, position),
            )
            alone["input_ids"], alone["mlm_labels"] = masked.input_ids, masked.labels
        assert sorted(alone) == sorted(batch)
        for key, value in alone.items():
            assert np.array_equal(batch[key][b], value), (position, key)
