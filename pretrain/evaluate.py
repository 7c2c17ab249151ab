"""Held-out evaluation of a model's token objective: the same batches for every model,
loss and accuracy weighted by targets, and the unigram baseline on those targets."""

from __future__ import annotations

from itertools import islice

import numpy as np
import torch
from torch import nn

from pretrain.config import Config
from pretrain.data.baseline import token_counts, unigram_baseline
from pretrain.data.loader import PretrainDataset, make_loader
from pretrain.data.shards import TokenShards
from pretrain.errors import UserError
from pretrain.labels import IGNORE_INDEX
from pretrain.objectives import compute_loss, model_inputs


def held_out_batches(
    cfg: Config, eval_batches: int, batch_size: int, checksum: str | None = None
) -> tuple[list[dict[str, torch.Tensor]], PretrainDataset]:
    """The first `eval_batches` batches of the held-out split: positions 0, 1, ..., each
    built and masked from (train.seed, position) alone, so every call sees the same ones.
    `checksum`: the model's tokenizer, which must be the data's."""
    dataset = PretrainDataset(cfg, "valid")
    if checksum is not None and checksum != dataset.tokenizer.info.checksum:
        raise UserError(
            f"the model was trained with another tokenizer than the data in {cfg.data.path}"
            " (checksum differs); evaluate it on data tokenized with its own tokenizer"
        )
    loader = make_loader(dataset, 0, batch_size)
    return list(islice(loader, eval_batches)), dataset


def _labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) target ids: the masked tokens (MLM) or the next tokens (causal LM)."""
    return batch["mlm_labels"] if "mlm_labels" in batch else batch["labels"]


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], cfg: Config
) -> dict[str, float]:
    """Held-out loss and accuracy of the token objective over every target of `batches`:
    per-batch means weighted back into sums."""
    key = "clm" if cfg.model.causal else "mlm"
    loss_sum, correct, n = 0.0, 0.0, 0
    for batch in batches:
        _, metrics = compute_loss(model(**model_inputs(batch)), batch, cfg)
        targets = int(metrics[f"{key}_tokens"])
        if targets:  # a batch without targets has no loss (a causal one would be NaN)
            loss_sum += float(metrics[f"{key}_loss"]) * targets
            correct += float(metrics[f"{key}_acc"]) * targets
            n += targets
    if n == 0:
        raise UserError(f"the held-out batches of {cfg.data.path} hold no {key} targets")
    return {"eval_loss": loss_sum / n, "eval_acc": correct / n, "eval_targets": n}


def baseline(
    batches: list[dict[str, torch.Tensor]], dataset: PretrainDataset, cfg: Config
) -> dict[str, float]:
    """The unigram baseline (training split's token counts) on the targets of `batches`."""
    labels = [_labels(b) for b in batches]
    targets = np.concatenate([row[row != IGNORE_INDEX].numpy() for row in labels])
    train = TokenShards(cfg.data.path, "train", dataset.tokenizer.info.checksum)
    base = unigram_baseline(token_counts(train, cfg.model.vocab_size), targets)
    return {"baseline_loss": base.loss, "baseline_acc": base.accuracy}
