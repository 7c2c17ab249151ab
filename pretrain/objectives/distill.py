"""Knowledge distillation: KL(teacher || student) of the token distributions at temperature T,
scaled by T^2 so that its gradients keep their size as T changes (Hinton et al.)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
