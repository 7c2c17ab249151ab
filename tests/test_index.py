"""The sample index (pretrain.data.index): the vectorised chunking cuts exactly the chunks
a sentence-by-sentence walk cuts, the index is built once per key and read back by every
later reader, a changed key or a half-written index is rebuilt, and a read-only data folder
keeps its index in the cache; each epoch's order is one permutation, shared the same way."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pretrain.data import index as index_module
from pretrain.data.index import chunk_targets, shared_index, sop_chunks
from pretrain.data.loader import EpochOrder, SharedOrder
from pretrain.data.samples import SOPSamples
from pretrain.data.shards import TokenShards


def walk(lengths, doc_offsets, max_tokens, short_seq_prob, seed):
    """The chunking as a loop over sentences: from each document's first sentence, take
    sentences until their tokens reach the target drawn for the chunk's first sentence."""
    target = chunk_targets(len(lengths), max_tokens, short_seq_prob, seed)
    rows, too_short = [], 0
    for doc in range(len(doc_offsets) - 1):
        s, last = int(doc_offsets[doc]), int(doc_offsets[doc + 1]) - 1
        while s <= last:
            e, size = s, int(lengths[s])
            while size < target[s] and e < last:
                e += 1
                size += int(lengths[e])
            if e > s or size >= 2:
                rows.append((doc, s - int(doc_offsets[doc]), e - s + 1))
            else:
                too_short += 1
            s = e + 1
    return np.array(rows, dtype=np.int64).reshape(-1, 3), too_short


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(6))
def test_vectorised_chunks_are_those_of_a_sentence_walk(seed):
    rng = np.random.default_rng(seed)
    docs = rng.integers(0, 40, size=30)  # some documents without sentences
    doc_offsets = np.concatenate([[0], np.cumsum(docs)])
    lengths = rng.choice([1, 1, 2, 3, 5, 8, 13, 30, 70], size=int(docs.sum()))
    for max_tokens, short in ((45, 0.1), (10, 0.5), (125, 0.0), (2, 1.0)):
        got = sop_chunks(lengths, doc_offsets, max_tokens, short, seed)
        want = walk(lengths, doc_offsets, max_tokens, short, seed)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1]
    assert want[1] > 0  # one-token sentences alone were met and counted


@pytest.mark.unit
@pytest.mark.parametrize("block,passes", [(7, 2), (1, 0), (64, 1024)])
def test_blocks_of_draws_and_doubling_cut_the_same_chunks(monkeypatch, block, passes):
    """Targets drawn a block at a time and walks finished by doubling (both at sizes tests
    cannot reach otherwise) give the chunks of the one-shot draws and the plain walk."""
    monkeypatch.setattr(index_module, "BLOCK", block)
    monkeypatch.setattr(index_module, "WALK_PASSES", passes)
    rng = np.random.default_rng(7)
    docs = rng.integers(0, 60, size=20)
    doc_offsets = np.concatenate([[0], np.cumsum(docs)])
    sizes = [1, 2, 3, 9, 40] + [0] * (block == 64)  # empty sentences: no bounded stretch
    lengths = rng.choice(sizes, size=int(docs.sum()))
    for max_tokens, short in ((45, 0.1), (6, 0.5)):
        got = sop_chunks(lengths, doc_offsets, max_tokens, short, 3)
        want = walk(lengths, doc_offsets, max_tokens, short, 3)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1]


@pytest.mark.unit
def test_the_index_is_built_once_and_read_back(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return np.arange(12, dtype=np.int64).reshape(4, 3), {"too_short": 2}

    first = shared_index(tmp_path, "train-sop", {"seq": 8}, build)
    again = shared_index(tmp_path, "train-sop", {"seq": 8}, build)
    assert len(calls) == 1
    assert isinstance(again[0], np.memmap) or again[0].base is not None  # memory-mapped
    np.testing.assert_array_equal(first[0], again[0])
    assert again[1] == {"too_short": 2}
    shared_index(tmp_path, "train-sop", {"seq": 16}, build)  # another key: its own index
    assert len(calls) == 2
    assert not list((tmp_path / "index").glob(".*tmp-*"))


@pytest.mark.unit
def test_an_index_whose_key_differs_or_is_half_written_is_rebuilt(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return np.full((3, 3), len(calls), dtype=np.int64), {}

    shared_index(tmp_path, "train-sop", {"seq": 8}, build)
    (key_file,) = (tmp_path / "index").glob("train-sop-*.json")
    written = json.loads(key_file.read_text())
    written["key"]["seq"] = 9  # a key file that does not say this run's key
    key_file.write_text(json.dumps(written))
    assert int(shared_index(tmp_path, "train-sop", {"seq": 8}, build)[0][0, 0]) == 2
    key_file.unlink()  # the array renamed into place, its key not yet: half-written
    assert int(shared_index(tmp_path, "train-sop", {"seq": 8}, build)[0][0, 0]) == 3
    (array_file,) = (tmp_path / "index").glob("train-sop-*.npy")
    array_file.write_bytes(b"not an array")
    assert int(shared_index(tmp_path, "train-sop", {"seq": 8}, build)[0][0, 0]) == 4


@pytest.mark.unit
def test_a_data_folder_that_cannot_hold_the_index_uses_the_cache(tmp_path, monkeypatch):
    # As a read-only folder looks to any user, root included: index/ cannot be made.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "data"
    (data).mkdir()
    (data / "index").write_text("a file where the folder would be")
    folder = index_module._folder(data)
    assert folder.parent == tmp_path / "cache" / "pretrain" / "index"
    calls = []
    shared_index(data, "train-sop", {"seq": 8}, lambda: (calls.append(1) or np.ones(3), {}))
    shared_index(data, "train-sop", {"seq": 8}, lambda: (calls.append(1) or np.ones(3), {}))
    assert len(calls) == 1 and list(folder.glob("train-sop-*.npy"))


@pytest.mark.unit
def test_samples_read_their_shared_index_and_a_new_preprocess_rebuilds_it(shards_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shards_dir, data, ignore=shutil.ignore_patterns("index"))
    first = SOPSamples(TokenShards(data), 48, 0.1, 0)
    again = SOPSamples(TokenShards(data), 48, 0.1, 0)
    np.testing.assert_array_equal(first.index, again.index)
    assert first.too_short == again.too_short
    assert len(list((data / "index").glob("train-sop-*.npy"))) == 1
    # The shards' index files replaced (preprocessed again): the key differs.
    for path in data.glob("train-*.sentences.npy"):
        os.utime(path, ns=(0, 0))
    SOPSamples(TokenShards(data), 48, 0.1, 0)
    assert len(list((data / "index").glob("train-sop-*.npy"))) == 2


@pytest.mark.unit
def test_the_epoch_order_is_shared_through_the_data_folder(tmp_path):
    n = 1000
    alone = EpochOrder(n, seed=3)
    shared = EpochOrder(n, seed=3, shared=SharedOrder(tmp_path, "train"))
    again = EpochOrder(n, seed=3, shared=SharedOrder(tmp_path, "train"))
    for epoch in range(2):
        positions = range(epoch * n, (epoch + 1) * n)
        expected = [alone(p) for p in positions]
        assert sorted(expected) == list(range(n))
        assert [shared(p) for p in positions] == expected == [again(p) for p in positions]
        assert isinstance(again._perm, np.memmap)  # read from the file, not drawn again
    assert len(list((tmp_path / "index").glob("train-order*.npy"))) == 2  # one per epoch
    assert [alone(p) for p in range(n)] != [alone(p) for p in range(n, 2 * n)]
    assert [alone(p) for p in range(n)] != [EpochOrder(n, seed=4)(p) for p in range(n)]


@pytest.mark.unit
def test_a_tiled_corpus_repeats_the_train_documents(shards_dir, tmp_path):
    from pretrain.data.tile import tile_shards

    tile_shards(shards_dir, tmp_path / "tiled", 3)
    source, tiled = TokenShards(shards_dir), TokenShards(tmp_path / "tiled")
    n = source.num_documents
    assert tiled.num_documents == 3 * n
    for doc in (0, n - 1):
        for copy in range(3):
            np.testing.assert_array_equal(
                tiled.document_tokens(copy * n + doc), source.document_tokens(doc)
            )
    valid = TokenShards(tmp_path / "tiled", "valid")
    assert valid.num_documents == TokenShards(shards_dir, "valid").num_documents
    assert len(SOPSamples(tiled, 48, 0.1, 0)) > 2.5 * len(SOPSamples(source, 48, 0.1, 0))
