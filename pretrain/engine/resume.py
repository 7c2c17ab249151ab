"""Resume policy: what a checkpoint may be continued with (the same model and tokenizer,
its LR schedule and loss unless asked to change them) and which layouts (ranks, ZeRO stage,
precision, pipeline stages) DeepSpeed can reshard it to. Reads run states only: no torch."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import Config, ConfigError, to_dict
from pretrain.config.reference import flat


class ResumeError(ConfigError):
    """A checkpoint this run cannot continue from (every rank reads the same run state)."""

    collective = True


SCHEDULE_KEYS = ("optim.lr", "optim.warmup_steps", "optim.decay", "optim.min_lr_ratio")


def schedule_changes(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, value now) of each LR-schedule setting this run changes.
    max_steps shapes the schedule only when it decays."""
    before, now = flat(saved["config"]), flat(cfg.to_dict())
    keys = list(SCHEDULE_KEYS)
    if cfg.optim.decay != "constant" or before["optim.decay"] != "constant":
        keys.append("train.max_steps")
    return [(k, before[k], now[k]) for k in keys if before[k] != now[k]]


LOSS_SECTIONS = ("objective", "distill")


def loss_changes(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, value now) of each setting of the loss (objective.*, distill.*:
    the terms, their weights, the masking, the teacher) this run changes. A key the
    checkpoint's config lacks had its default then."""
    changes = []
    for section in LOSS_SECTIONS:
        ours = getattr(cfg, section)
        now = flat(to_dict(ours), f"{section}.")
        default = flat(to_dict(type(ours)()), f"{section}.")
        before = {**default, **flat(saved["config"].get(section, {}), f"{section}.")}
        changes += [(k, before[k], v) for k, v in now.items() if before[k] != v]
    return changes


def check_resumable(
    saved: dict, cfg: Config, tokenizer_checksum: str, world: int, where: str
) -> list[tuple[str, object, object]]:
    """A checkpoint continues only the same model on the same tokenizer, and its LR
    schedule and its loss unless asked to change them; on another layout (ranks, ZeRO
    stage, precision) only where DeepSpeed can reshard it. Returns the schedule changes
    allowed."""
    now = flat(to_dict(cfg.model), "model.")
    before = flat(saved["config"]["model"], "model.")
    changed = [k for k in sorted(now) if before.get(k) != now[k]]
    if changed:
        k = changed[0]
        raise ResumeError(
            f"cannot resume from {where}: {k} is {before.get(k)!r} there and {now[k]!r} now;"
            " restore the model config or start a new train.output_dir"
        )
    if saved["tokenizer_checksum"] != tokenizer_checksum:
        raise ResumeError(
            f"cannot resume from {where}: it was trained on shards of another tokenizer;"
            " use the original data.path or a new train.output_dir"
        )
    step = saved["step"]
    if step > cfg.train.max_steps:
        raise ResumeError(
            f"cannot resume from {where}: it is at step {step}, past train.max_steps"
            f" ({cfg.train.max_steps}); raise train.max_steps or start a new train.output_dir"
        )
    schedule = schedule_changes(saved, cfg)
    if schedule and not cfg.train.replan_schedule:
        key, before, now = schedule[0]
        raise ResumeError(
            f"cannot resume from {where} with {key}={now!r}: its LR schedule was planned with"
            f" {key}={before!r}; pass --train.replan_schedule=true to re-plan the LR from"
            f" step {step} with the new settings, or restore {key}"
        )
    loss = loss_changes(saved, cfg)
    if loss and not cfg.train.allow_loss_change:
        key, before, now = loss[0]
        raise ResumeError(
            f"cannot resume from {where} with {key}={now!r}: it was trained with"
            f" {key}={before!r}, and its steps would go on under another loss; restore {key},"
            " or pass --train.allow_loss_change=true to go on with the new one"
        )
    check_reshardable(saved_layout(saved), layout(cfg, world), where)
    return schedule


@dataclass(frozen=True)
class Layout:
    """How a run holds its states: ranks, ZeRO stage, precision and pipeline stages."""

    ranks: int
    zero_stage: int
    precision: str
    pipeline_stages: int = 1

    def __str__(self) -> str:
        ranks = f"{self.ranks} rank{'s' if self.ranks > 1 else ''}"
        pipeline = f", {self.pipeline_stages} pipeline stages" if self.pipeline_stages > 1 else ""
        return f"{ranks} ZeRO-{self.zero_stage} {self.precision}{pipeline}"


def layout(cfg: Config, ranks: int) -> Layout:
    """The layout of a run of `cfg` on `ranks` ranks."""
    engine = cfg.engine
    return Layout(ranks, engine.zero_stage, engine.precision, engine.pipeline_stages)


def saved_layout(saved: dict) -> Layout:
    """The layout of the run that saved `saved` (its run state)."""
    engine = saved["config"]["engine"]
    stages = engine.get("pipeline_stages", 1)  # saved before pipelines existed
    return Layout(saved["world_size"], engine["zero_stage"], engine["precision"], stages)


def needs_resharding(before: Layout, now: Layout) -> bool:
    """Another layout loads from the universal form, except between ZeRO-0 runs: ZeRO-0
    keeps whole states on every rank, which any rank count loads as saved."""
    return before != now and not before.zero_stage == now.zero_stage == 0


def check_reshardable(before: Layout, now: Layout, where: str) -> None:
    """A layout the universal form cannot carry `before` over to is one line."""
    if refused := _not_reshardable(before, now):
        reason, fix = refused
        raise ResumeError(
            f"cannot resume from {where} (saved by {before}) with {now}: {reason};"
            f" resume with {fix}"
        )


def _not_reshardable(before: Layout, now: Layout) -> tuple[str, str] | None:
    """(why, the fix) where DeepSpeed cannot convert: it converts the partitioned states
    of ZeRO stages 1-3 (their fp32 master weights into another precision too), but neither
    reads nor writes ZeRO-0's whole states; fp16's loss scale has no counterpart in the
    other precisions; a pipeline's per-layer files are not resharded here."""
    if before != now and max(before.pipeline_stages, now.pipeline_stages) > 1:
        return "a pipelined checkpoint continues only on its own layout", f"{before}"
    stages = {before.zero_stage, now.zero_stage}
    if 0 in stages and len(stages) > 1:
        fix = "engine.zero_stage=0" if before.zero_stage == 0 else "engine.zero_stage 1-3"
        return "DeepSpeed reshards only between ZeRO stages 1-3", fix
    if before.precision == now.precision:
        return None
    fix = f"engine.precision={before.precision}"
    if 0 in stages:
        return "DeepSpeed converts a precision only at ZeRO stages 1-3", fix
    if "fp16" in (before.precision, now.precision):
        return "fp16's dynamic loss scale does not carry over to another precision", fix
    return None
