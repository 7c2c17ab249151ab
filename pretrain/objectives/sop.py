"""Sentence-order prediction: were the two segments swapped?"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sop_loss(
    sop_logits_B2: torch.Tensor, labels_B: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = F.cross_entropy(sop_logits_B2.float(), labels_B)
    accuracy = (sop_logits_B2.argmax(-1) == labels_B).float().mean()
    return loss, {"sop_loss": loss.detach(), "sop_acc": accuracy}
