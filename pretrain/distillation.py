"""The teacher side of a distillation run (`distill.*`): the teacher, read once and held by
every rank; the student -> teacher width projection of hidden-state matching; and the
teacher's outputs and the hidden-state term of each batch. The KD term itself is an
objective (objectives/distill.py, added by `compute_loss` from the teacher's logits).

The Trainer builds a `Distiller` where `distill.teacher` is set and asks it, per batch, for
the teacher's outputs and the hidden-state term; it knows nothing else of distillation.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from pretrain import hardware
from pretrain.config import Config
from pretrain.data.tokenizer import Tokenizer
from pretrain.engine import runtime
from pretrain.errors import UserError
from pretrain.export.teacher import TeacherSource, describe_teacher, load_teacher
from pretrain.model import SharedTransformer
from pretrain.objectives import distill


class Distiller:
    """distill.teacher on every rank, whole (never handed to DeepSpeed: not partitioned,
    not saved), in the run's precision, without gradients; and what the student learns
    from it beyond its logits."""

    def __init__(self, cfg: Config, student_tokenizer: Tokenizer, world: runtime.World) -> None:
        self.cfg = cfg
        self.teacher = load_teacher(
            cfg,
            student_tokenizer,
            world.device,
            hardware.DTYPES[cfg.engine.precision],
            _find_teacher(cfg, world),
        )
        self.hidden_weight = cfg.distill.hidden_weight
        self.layer_map = distill.layer_map(
            cfg.distill.layer_map, cfg.model.num_layers, self.teacher.cfg.num_layers
        )
        if world.rank == 0:
            print(f"distilling from {cfg.distill.teacher}", file=sys.stderr, flush=True)

    @property
    def matches_hidden(self) -> bool:
        """Whether the student's hidden states are matched (the forward must return them)."""
        return self.hidden_weight > 0

    def add_projection(self, student: SharedTransformer) -> None:
        """The student -> teacher width projection, as a child of the student module so that
        the engine trains, partitions and checkpoints it with the student (exports leave it
        out). Drawn from its own generator: the student's initialisation and dropout see the
        same random numbers as without it. None is needed where the widths are equal."""
        if not self.matches_hidden:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            project = distill.projection(self.cfg.model.hidden_size, self.teacher.cfg.hidden_size)
        if project is not None:
            student.add_module(distill.PROJECTION, project)

    @torch.no_grad()
    def teach(self, inputs: dict[str, torch.Tensor]) -> Any:
        """The teacher's output on the student's inputs (logits at the same positions)."""
        return self.teacher(**inputs, output_hidden_states=self.matches_hidden)

    def hidden_term(
        self, student: Any, teacher: Any, module: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """distill.hidden_weight times the hidden-state loss of one batch, with its metrics;
        `module` is the student module the engine holds (with the projection, if any)."""
        term, metrics = distill.hidden_loss(
            student.hidden_states,
            teacher.hidden_states,
            self.layer_map,
            getattr(module, distill.PROJECTION, None),
            batch.get("attention_mask"),
        )
        return self.hidden_weight * term, metrics


def _find_teacher(cfg: Config, world: runtime.World) -> TeacherSource:
    """Rank 0 finds the teacher (hashing a run's checkpoint files once, not once per rank)
    and tells the others, or gives them its error."""
    found: TeacherSource | UserError | None = None
    if world.rank == 0:
        try:
            found = describe_teacher(cfg.distill.teacher)
        except UserError as err:
            found = err
    found = runtime.broadcast_object(found)
    if isinstance(found, UserError):
        raise found
    return found
