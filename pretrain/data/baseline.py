"""The unigram baseline of masked-LM: what a model scores that knows only word frequencies.

A model stuck at this baseline predicts every masked token from the training unigram
distribution, whatever the context; the most frequent token is then its guess everywhere.
Comparing the held-out MLM loss and accuracy with these two numbers tells whether a run
has learned anything beyond frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pretrain.config import Config
from pretrain.data.shards import TokenShards
from pretrain.labels import IGNORE_INDEX


@dataclass(frozen=True)
class UnigramBaseline:
    loss: float
    """Mean cross-entropy (nats) of the training unigram distribution at the targets."""
    accuracy: float
    """Fraction of targets equal to the most frequent training token."""
    targets: int
    """Number of targets scored."""


def token_counts(shards: TokenShards, vocab_size: int) -> np.ndarray:
    """int64 (V,) occurrences of each token id over every document of `shards`."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for doc in range(shards.num_documents):
        counts += np.bincount(shards.document_tokens(doc), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_baseline(counts: np.ndarray, targets: np.ndarray) -> UnigramBaseline:
    """Score the unigram distribution `counts` (add-one smoothed) on the token ids `targets`."""
    probs = (counts + 1.0) / (counts.sum() + len(counts))
    targets = np.asarray(targets, dtype=np.int64)
    if targets.size == 0:
        raise ValueError("unigram_baseline needs at least one target")
    return UnigramBaseline(
        loss=float(-np.log(probs[targets]).mean()),
        accuracy=float((targets == int(counts.argmax())).mean()),
        targets=int(targets.size),
    )


def held_out_baseline(cfg: Config, num_samples: int) -> UnigramBaseline:
    """The baseline on the masked targets of held-out positions [0, num_samples): the
    samples the trainer evaluates on (train.eval_steps x micro batch x ranks), masked the
    same way, scored with the token counts of the training split."""
    from pretrain.data.loader import PretrainDataset

    valid = PretrainDataset(cfg, "valid")
    labels = [valid[p]["mlm_labels"] for p in range(num_samples)]
    targets = np.concatenate([row[row != IGNORE_INDEX] for row in labels])
    train = TokenShards(cfg.data.path, "train", valid.tokenizer.info.checksum)
    return unigram_baseline(token_counts(train, cfg.model.vocab_size), targets)
