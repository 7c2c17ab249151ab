"""Causal language modelling: next-token cross-entropy over packed windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.labels import IGNORE_INDEX


def clm_loss(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`labels_BT` are already the next tokens (the loader shifts them)."""
    logits_NV, labels_N = logits_BTV.flatten(0, 1).float(), labels_BT.flatten()
    loss = F.cross_entropy(logits_NV, labels_N, ignore_index=IGNORE_INDEX)
    valid = labels_N != IGNORE_INDEX
    accuracy = (logits_NV.argmax(-1) == labels_N)[valid].float().mean()
    return loss, {"clm_loss": loss.detach(), "clm_acc": accuracy, "clm_tokens": valid.sum()}
