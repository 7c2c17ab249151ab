"""A run's checkpoints as the Trainer uses them: resume from the newest that verifies
(resharding it when the layout changed, re-planning the LR schedule when its keys did),
save, and which checkpoint is the last sound state of the run.

Sound: a checkpoint is never written while steps are being skipped as non-finite or when
the weights themselves are not finite, so the newest checkpoint is always one to resume
from; `unsound` says what happened since it, which the Trainer turns into the run's error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deepspeed import DeepSpeedEngine

from pretrain.config import Config
from pretrain.engine import checkpoint, manifest, resume, runtime, universal


@dataclass(frozen=True)
class Position:
    """Where a resumed run continues: optimizer steps taken and samples consumed."""

    step: int
    consumed: int


class Checkpointer:
    """The checkpoints/ folder of one run, seen by every rank alike (rank 0 verifies and
    tells the others). `say` prints one line for the run (rank 0's)."""

    def __init__(
        self, folder: Path, cfg: Config, world: runtime.World, say: Callable[[str], None]
    ) -> None:
        self.folder, self.cfg, self.world, self.say = folder, cfg, world, say
        self.last_saved = -1
        # Since the last sound checkpoint (or the start): steps skipped as non-finite, and
        # whether a save found the weights non-finite.
        self.skipped_since_sound = 0
        self.nonfinite_weights = False

    def resume(self, engine: DeepSpeedEngine, tokenizer_checksum: str) -> Position | None:
        """Load the newest checkpoint that verifies into `engine`; None when there is none
        (each newer one skipped is named)."""
        # Rank 0 verifies (hashing every file once, not once per rank) and tells the others.
        newest = manifest.newest_valid(self.folder) if self.world.rank == 0 else None
        tag, skipped = runtime.broadcast_object(newest)
        for bad, problem in skipped:
            self.say(f"warning: skipping checkpoint {self.folder / bad}: {problem}")
        if tag is None:
            return None
        where = str(self.folder / tag)
        state = manifest.read_run_state(self.folder, tag)
        schedule = resume.check_resumable(
            state, self.cfg, tokenizer_checksum, self.world.size, where
        )
        for key, before, now in resume.loss_changes(state, self.cfg):
            self.say(f"resuming with a changed loss: {key} {before!r} -> {now!r}")
        from_universal = self._reshard(state, tag, where)
        saved_ranks = state["world_size"]
        checkpoint.load(engine, self.folder, tag, self.world.rank, saved_ranks, from_universal)
        at = Position(state["step"], state["consumed_samples"])
        self.last_saved = at.step
        self.say(f"resumed from {where} at step {at.step} ({at.consumed} samples)")
        if schedule:
            lr = runtime.replan_schedule(engine, at.step, self.cfg.optim.lr)
            keys = ", ".join(key for key, _, _ in schedule)
            self.say(f"LR schedule re-planned ({keys} changed): lr {lr:.3g} at step {at.step}")
        return at

    def _reshard(self, state: dict, tag: str, where: str) -> bool:
        """Whether checkpoint `tag` loads from its universal form: saved on another layout,
        it is converted by rank 0 (once: later resumes reuse the conversion)."""
        before = resume.saved_layout(state)
        now = resume.layout(self.cfg, self.world.size)
        if not resume.needs_resharding(before, now):
            return False
        form = self.folder / tag / manifest.UNIVERSAL
        self.say(f"resharding checkpoint from {before} to {now} through {form}")
        universal.prepare_universal(self.folder, tag, self.world.rank, where)
        return True

    def save(self, engine: DeepSpeedEngine, step: int, client_state: dict, skipping: bool) -> None:
        """Checkpoint `step` unless it is saved already, or is not sound: `skipping` (the
        latest steps were skipped as non-finite: the weights may have diverged) or weights
        that are not finite. Every rank calls it at the same steps."""
        if self.last_saved == step:
            return
        if skipping:
            self.say(f"step {step}: not saving while steps are skipped as non-finite")
            return
        # The update of a step whose loss was finite can still leave the weights inf or NaN.
        if not runtime.weights_finite(engine.module, self.world.device):
            self.nonfinite_weights = True
            self.say(
                f"step {step}: the weights are not finite: not saving"
                f" (the last sound checkpoint: {self.last_sound()})"
            )
            return
        tag = checkpoint.save(
            engine,
            self.folder,
            step,
            client_state,
            self.cfg.checkpoint.keep_last,
            self.world.rank,
        )
        self.last_saved = step
        self.skipped_since_sound, self.nonfinite_weights = 0, False
        self.say(f"saved checkpoint {self.folder / tag}")

    def count_skipped(self) -> None:
        """One more step skipped as non-finite since the last sound checkpoint."""
        self.skipped_since_sound += 1

    def last_sound(self) -> str:
        """The checkpoint this run last saved or resumed from ("none" before either)."""
        if self.last_saved < 0:
            return "none"
        return str(self.folder / manifest.tag_for(self.last_saved))

    def unsound(self) -> str | None:
        """What makes the run's end state unsound since the last sound checkpoint (skipped
        steps, non-finite weights), with what to do; None when it is sound."""
        if not (self.skipped_since_sound or self.nonfinite_weights):
            return None
        what = (
            f"{self.skipped_since_sound} of its steps after the last sound checkpoint were"
            " skipped as non-finite"
        )
        if self.nonfinite_weights:
            what = "its weights became non-finite" + (
                f" and {what}" if self.skipped_since_sound else ""
            )
        last = self.last_sound()
        then = f"resume from {last}" if self.last_saved >= 0 else "start again"
        return (
            f"the run diverged: {what}; the last sound checkpoint is {last}; lower optim.lr"
            f" and {then}"
        )
