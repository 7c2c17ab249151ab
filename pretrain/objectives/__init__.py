"""Pretraining objectives and how they combine into one loss.

Loss = weighted MLM (+ SOP) for the albert family, or causal LM for llama, plus the ACT
ponder cost and the relaxed-sharing tie penalty when the model has them, plus
distill.alpha * T^2 * KL(teacher || student) when a teacher's logits are given. Every term
is also returned on its own, for logging.
"""

from __future__ import annotations

import torch

from pretrain.config import Config
from pretrain.model import ModelOutput
from pretrain.objectives.clm import clm_loss
from pretrain.objectives.distill import kd_loss
from pretrain.objectives.mlm import mlm_loss, predict_mask
from pretrain.objectives.sop import sop_loss

__all__ = ["clm_loss", "compute_loss", "kd_loss", "mlm_loss", "model_inputs", "sop_loss"]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Keyword arguments of the model's forward for a loader batch."""
    labels = batch.get("mlm_labels")
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch.get("attention_mask"),
        "token_type_ids": batch.get("token_type_ids"),
        "predict_mask": predict_mask(labels) if labels is not None else None,
    }


def compute_loss(
    output: ModelOutput,
    batch: dict[str, torch.Tensor],
    cfg: Config,
    teacher_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and detached metrics (each loss term, accuracies, token counts).
    `teacher_logits`: the teacher's, at the positions of `output.logits`."""
    o, terms, metrics = cfg.objective, [], {}
    if "mlm_labels" in batch:
        loss, m = mlm_loss(output.logits, batch["mlm_labels"])
        terms.append(o.mlm_weight * loss)
        metrics |= m
    if "sop_labels" in batch and output.sop_logits is not None:
        loss, m = sop_loss(output.sop_logits, batch["sop_labels"])
        terms.append(o.sop_weight * loss)
        metrics |= m
    if "labels" in batch:
        loss, m = clm_loss(output.logits, batch["labels"])
        terms.append(o.clm_weight * loss)
        metrics |= m
    if output.ponder_cost is not None:
        terms.append(cfg.model.universal.ponder_weight * output.ponder_cost)
        metrics["ponder_cost"] = output.ponder_cost.detach()
    if output.tie_penalty is not None and cfg.model.sharing.tie_penalty > 0:
        terms.append(cfg.model.sharing.tie_penalty * output.tie_penalty)
        metrics["tie_penalty"] = output.tie_penalty.detach()
    if teacher_logits is not None:
        loss, m = kd_loss(output.logits, teacher_logits, cfg.distill.temperature)
        terms.append(cfg.distill.alpha * loss)
        metrics |= m
    total = torch.stack(terms).sum()
    metrics["loss"] = total.detach()
    return total, metrics
