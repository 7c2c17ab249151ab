"""Masked language modelling: cross-entropy at the masked positions only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.labels import IGNORE_INDEX


def predict_mask(labels_BT: torch.Tensor) -> torch.Tensor:
    """bool (B, T): the positions whose token the model must predict."""
    return labels_BT != IGNORE_INDEX


def mlm_loss(
    logits_NV: torch.Tensor, labels_BT: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`logits_NV` are the head's outputs at `predict_mask(labels_BT)`, in row-major order."""
    targets_N = labels_BT[predict_mask(labels_BT)]
    n = targets_N.numel()
    # One fp32 copy for both: the loss wants it, and argmax over bf16 is several times
    # slower on a CPU than over fp32 (the conversion is exact, so the argmax is the same).
    logits_NV = logits_NV.float()
    loss = F.cross_entropy(logits_NV, targets_N, reduction="sum") / max(n, 1)
    correct = (logits_NV.argmax(-1) == targets_N).sum()
    return loss, {
        "mlm_loss": loss.detach(),
        "mlm_acc": correct / max(n, 1),
        "mlm_tokens": torch.tensor(n),
    }
