"""Checks of what a run reads and writes, made before it starts: by the launchers once
(`python -m pretrain check`), and by the trainer on every rank for the output directory."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pretrain.config import Config, ConfigError


class RunPathError(ConfigError):
    """An output directory the run cannot use (the same for every rank)."""

    collective = True


def check_output_dir(output: Path) -> None:
    """`output` is, or can be made, a writable directory; nothing is created here."""
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == output else f"lies under a file ({existing})"
        raise RunPathError(f"train.output_dir {output} {what}; choose a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise RunPathError(
            f"train.output_dir {output} is not writable ({err.strerror} in {existing});"
            " choose another"
        ) from None


def check_data(cfg: Config) -> None:
    from pretrain.data.preprocess import TOKENIZER_DIR
    from pretrain.data.shards import TokenShards
    from pretrain.data.tokenizer import Tokenizer

    data = Path(cfg.data.path)
    tokenizer = Tokenizer(Path(cfg.data.tokenizer or data / TOKENIZER_DIR))
    splits = ["train", "valid"] if cfg.train.eval_every else ["train"]
    for split in splits:
        TokenShards(data, split, tokenizer.info.checksum)


def check_distill(cfg: Config) -> None:
    """distill.teacher loads as a model config and tokenizer that fit the student: its
    tokenizer is the student's (`pretrain.export.teacher`), its vocabulary size and
    objective the same."""
    if not cfg.distill.teacher:
        return
    from pretrain.data.preprocess import TOKENIZER_DIR
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.export.teacher import check_teacher, describe_teacher

    student = Tokenizer(Path(cfg.data.tokenizer or Path(cfg.data.path) / TOKENIZER_DIR))
    check_teacher(describe_teacher(cfg.distill.teacher), cfg, student)
