"""Held-out statistics (pretrain.evaluate.HeldOut) against a cross-entropy over all targets
at once: however the targets fall into batches, the figure is the same."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.evaluate import HeldOut
from pretrain.labels import IGNORE_INDEX
from pretrain.objectives import clm_loss, mlm_loss, sop_loss

pytestmark = pytest.mark.unit

V = 11


def batches(target_rows: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits at the targets, labels) per batch: batch i has target_rows[i] targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in target_rows:
        labels_BT = torch.full((2, 8), IGNORE_INDEX)
        labels_BT.view(-1)[:n] = torch.randint(0, V, (n,), generator=g)
        out.append((torch.randn(n, V, generator=g), labels_BT))
    return out


def test_mlm_figures_are_over_all_targets_not_per_batch_means():
    data = batches([1, 9, 0, 4])
    held_out = HeldOut()
    for logits_NV, labels_BT in data:
        held_out.add(mlm_loss(logits_NV, labels_BT)[1])
    logits = torch.cat([lg for lg, _ in data])
    targets = torch.cat([lb[lb != IGNORE_INDEX] for _, lb in data])
    means = held_out.means()
    assert means["mlm_loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert means["mlm_acc"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    assert means["mlm_tokens"] == 14
    per_batch = [mlm_loss(lg, lb)[0].item() for lg, lb in data]
    assert means["mlm_loss"] != pytest.approx(sum(per_batch) / len(per_batch), rel=1e-3)


def test_a_causal_batch_without_targets_does_not_turn_the_figure_nan():
    g = torch.Generator().manual_seed(1)
    held_out = HeldOut()
    labels = [torch.randint(0, V, (1, 6), generator=g), torch.full((1, 6), IGNORE_INDEX)]
    logits = [torch.randn(1, 6, V, generator=g) for _ in labels]
    for logits_BTV, labels_BT in zip(logits, labels, strict=True):
        metrics = clm_loss(logits_BTV, labels_BT)[1]
        held_out.add(metrics)
    assert math.isnan(float(clm_loss(logits[1], labels[1])[1]["clm_loss"]))
    expected = clm_loss(logits[0], labels[0])[1]["clm_loss"].item()
    assert held_out.means()["clm_loss"] == pytest.approx(expected)
    assert held_out.means()["clm_tokens"] == 6


def test_sums_combined_over_ranks_give_the_figure_of_all_targets():
    """The trainer all-reduces the sums (their mean over ranks): ratios hold, so two ranks'
    halves give the figure of the whole."""
    data = batches([3, 12, 5, 7], seed=2)
    whole, ranks = HeldOut(), [HeldOut(), HeldOut()]
    for i, (logits_NV, labels_BT) in enumerate(data):
        metrics = mlm_loss(logits_NV, labels_BT)[1]
        whole.add(metrics)
        ranks[i % 2].add(metrics)
    assert ranks[0].sums.keys() == ranks[1].sums.keys()
    mean = {k: (ranks[0].sums[k] + ranks[1].sums[k]) / 2 for k in ranks[0].sums}
    combined = ranks[0].means(mean)
    assert combined["mlm_loss"] == pytest.approx(whole.means()["mlm_loss"])
    assert combined["mlm_acc"] == pytest.approx(whole.means()["mlm_acc"])


def test_sentence_order_is_weighted_by_batches():
    g = torch.Generator().manual_seed(3)
    held_out, accs = HeldOut(), []
    for _ in range(3):
        labels_B = torch.randint(0, 2, (4,), generator=g)
        metrics = sop_loss(torch.randn(4, 2, generator=g), labels_B)[1]
        held_out.add(metrics)
        accs.append(float(metrics["sop_acc"]))
    assert held_out.means()["sop_acc"] == pytest.approx(sum(accs) / 3)
