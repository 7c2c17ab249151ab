"""The unigram baseline the demo and the learning A/B print next to held-out MLM."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pretrain.config import load_config
from pretrain.data.baseline import held_out_baseline, token_counts, unigram_baseline
from pretrain.data.loader import PretrainDataset
from pretrain.data.masking import IGNORE_INDEX

pytestmark = pytest.mark.unit


def test_unigram_baseline_scores_smoothed_frequencies():
    base = unigram_baseline(np.array([0, 3, 1]), np.array([1, 1, 2]))
    # add-one smoothing: p = (count + 1) / (4 + 3)
    assert base.loss == pytest.approx(-(2 * math.log(4 / 7) + math.log(2 / 7)) / 3)
    assert base.accuracy == pytest.approx(2 / 3)  # token 1 is the most frequent
    assert base.targets == 3


def test_held_out_baseline_uses_the_trainers_eval_targets(shards_dir):
    cfg = load_config(None, {"data.path": str(shards_dir), "model.vocab_size": 150})
    base = held_out_baseline(cfg, 16)
    valid = PretrainDataset(cfg, "valid")
    labels = np.concatenate([valid[p]["mlm_labels"] for p in range(16)])
    assert base.targets == int((labels != IGNORE_INDEX).sum()) > 0
    shards = PretrainDataset(cfg, "train").shards
    counts = token_counts(shards, 150)
    assert counts.sum() == sum(len(shards.document_tokens(d)) for d in range(shards.num_documents))
    # Frequencies beat a uniform guess over the vocabulary on real text.
    assert 0.0 < base.loss < math.log(150)
    assert 0.0 < base.accuracy < 1.0
