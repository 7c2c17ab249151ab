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


class HeldOut:
    """Sums of held-out metrics, each weighted by what it is a mean over: an objective's
    loss and accuracy by its targets (`mlm_tokens`, `clm_tokens`), the target counts
    summed, every other metric (SOP, the total loss, KD) by batches. So the result is the
    metric over all targets, however they fell into batches, ranks or replicas."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        """One batch's metrics. Every key is summed on every call, so ranks hold the same
        keys for one all-reduce, however their batches fell."""
        for key, value in metrics.items():
            if key.endswith("_tokens"):
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
                continue
            weight = _weight(key, metrics)
            # a batch without targets has no loss (a causal one's is NaN): weight 0, sum 0
            weighted = float(value) * weight if weight else 0.0
            self.sums[key] = self.sums.get(key, 0.0) + weighted
            self.sums[f"{key}/weight"] = self.sums.get(f"{key}/weight", 0.0) + weight

    def means(self, sums: dict[str, float] | None = None) -> dict[str, float]:
        """Each metric's weighted mean and each target count's total. `sums`: these sums
        combined over ranks (all-reduced), when not this rank's own."""
        sums = self.sums if sums is None else sums
        out = {}
        for key, value in sums.items():
            if key.endswith("_tokens"):
                out[key] = value
            elif not key.endswith("/weight") and sums[f"{key}/weight"] > 0:
                out[key] = value / sums[f"{key}/weight"]
        return out


def _weight(key: str, metrics: dict[str, torch.Tensor | float]) -> float:
    objective = key.rsplit("_", 1)[0]
    count = metrics.get(f"{objective}_tokens")
    return 1.0 if count is None else float(count)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], cfg: Config
) -> dict[str, float]:
    """Held-out loss and accuracy of the token objective over every target of `batches`."""
    key = cfg.model.spec.objective
    held_out = HeldOut()
    for batch in batches:
        held_out.add(compute_loss(model(**model_inputs(batch)), batch, cfg)[1])
    means = held_out.means()
    n = int(means.get(f"{key}_tokens", 0))
    if n == 0:
        raise UserError(f"the held-out batches of {cfg.data.path} hold no {key} targets")
    return {"eval_loss": means[f"{key}_loss"], "eval_acc": means[f"{key}_acc"], "eval_targets": n}


def baseline(
    batches: list[dict[str, torch.Tensor]], dataset: PretrainDataset, cfg: Config
) -> dict[str, float]:
    """The unigram baseline (training split's token counts) on the targets of `batches`."""
    labels = [_labels(b) for b in batches]
    targets = np.concatenate([row[row != IGNORE_INDEX].numpy() for row in labels])
    train = TokenShards(cfg.data.path, "train", dataset.tokenizer.info.checksum)
    base = unigram_baseline(token_counts(train, cfg.model.vocab_size), targets)
    return {"baseline_loss": base.loss, "baseline_acc": base.accuracy}
