"""Knowledge distillation: KL(teacher || student) of the token distributions at temperature T,
scaled by T^2 so that its gradients keep their size as T changes (Hinton et al.), and the
matching of hidden states layer by layer (TinyBERT-style) through a learned projection."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PROJECTION = "distill_projection"
"""Name of the student -> teacher width projection, trained with the student: the trainer
adds it to the student module (so that the engine optimizes, partitions and checkpoints it)
and exports leave it out."""


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """T^2 * mean over positions of KL(softmax(t/T) || softmax(s/T)). The logits are (..., V)
    at the same positions: the predicted ones for MLM (the heads compute only those), every
    position of the window for causal LM. Computed in fp32 whatever the run's precision."""
    s_NV = student_logits.flatten(0, -2).float() / temperature
    t_NV = teacher_logits.flatten(0, -2).float() / temperature
    log_p_t = F.log_softmax(t_NV, dim=-1)
    kl_N = (log_p_t.exp() * (log_p_t - F.log_softmax(s_NV, dim=-1))).sum(-1)
    loss = temperature**2 * kl_N.sum() / max(kl_N.numel(), 1)
    return loss, {"kd_loss": loss.detach()}


def layer_map(configured: Sequence[int], student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer of each student layer application (-1: unmatched): the configured
    map, or each application i of L matched to the teacher layer j at the same relative
    depth, (i + 1) / L = (j + 1) / L_teacher, where there is one (the last layers always)."""
    if configured:
        return list(configured)
    L, T = student_layers, teacher_layers
    return [(i + 1) * T // L - 1 if (i + 1) * T % L == 0 else -1 for i in range(L)]


def projection(student_width: int, teacher_width: int) -> nn.Module | None:
    """The learned student -> teacher projection, or None when the widths agree."""
    if student_width == teacher_width:
        return None
    return nn.Linear(student_width, teacher_width, bias=False)


def hidden_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    pairs: Sequence[int],
    project: nn.Module | None,
    attention_mask_BT: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over matched applications i of MSE(project(student[i]), teacher[pairs[i]]) at
    the real tokens (all positions without a mask), in fp32."""
    keep_BT = None if attention_mask_BT is None else attention_mask_BT.bool()
    terms = []
    for i, t in enumerate(pairs):
        if t < 0:
            continue
        s_BTH = student[i] if project is None else project(student[i])
        s_NH, t_NH = (
            (s_BTH, teacher[t]) if keep_BT is None else (s_BTH[keep_BT], teacher[t][keep_BT])
        )
        terms.append(F.mse_loss(s_NH.float(), t_NH.float()))
    loss = torch.stack(terms).mean()
    return loss, {"hidden_loss": loss.detach()}
