"""The `pretrain` command: one verb per job, each an argument parser and one library call.

    pretrain VERB [ARGS ...]      (or python -m pretrain VERB ...; pretrain VERB --help)

The verbs of other modules are in VERBS (pretrain --help lists them). The verbs here run
before any rank starts, so that a mistake ends in one line instead of one traceback per rank:

    python -m pretrain config CONFIG [--dotted.overrides]   the config, resolved, as YAML
    python -m pretrain config CONFIG --diff [...]           only what differs from the defaults
    python -m pretrain config --help                        every key: type, default, doc
    python -m pretrain config --markdown                    the same as docs/config.md
    python -m pretrain check CONFIG [--dotted.overrides]    also what the run reads and writes
    python -m pretrain machine                              CPU class / GPU, matmul peaks,
                                                            what engine.precision=auto runs

`check` (the launchers run it) validates the config, then makes sure train.output_dir is a
writable directory, that the data, its tokenizer and its shard indexes load, and that a
distillation teacher (distill.teacher) loads with the student's tokenizer and vocabulary.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import yaml

from pretrain.config import ConfigError, load_config, to_dict
from pretrain.config.reference import diff_text, help_text, markdown
from pretrain.errors import did_you_mean, main_guard
from pretrain.preflight import check_data, check_distill, check_output_dir

# torch is imported only by the commands that need it: the launchers run `check` before
# every job, and importing torch there would cost more than the check itself.

VERBS = {
    # verb: (module whose main(argv) runs it, or module:function, what it does)
    "prepare-corpus": ("pretrain.prepare:corpus_main", "copy the default corpus into a folder"),
    "tokenizer": ("pretrain.prepare:tokenizer_main", "train a SentencePiece tokenizer"),
    "preprocess": ("pretrain.prepare:preprocess_main", "tokenize text into token shards"),
    "train": ("pretrain.train", "pretrain one rank (the launchers start every rank)"),
    "summary": ("pretrain.summary", "parameters and FLOPs per token of a config"),
    "report": ("pretrain.report", "size, held-out quality, compute and speed of models"),
    "compress": ("pretrain.compress", "int8 and pruned exports of a trained model"),
    "convert": ("pretrain.convert", "a checkpoint to native or Hugging Face; import from HF"),
    "finetune": ("pretrain.finetune", "fine-tune an export with Hugging Face's Trainer"),
    "sweep": ("pretrain.study", "the sharing study: train and compare sharing plans"),
    "bench": ("pretrain.bench_train", "tokens/s and MFU of ours beside Hugging Face's"),
    "check-learning": ("pretrain.check_learning", "can tiny models learn a copy task"),
}
OWN_VERBS = ("config", "check", "machine")
USAGE = (
    "usage: pretrain (config | check) CONFIG [--dotted.overrides ...]; pretrain config --help"
    " lists every key; pretrain machine; pretrain (" + " | ".join(VERBS) + ") ARGS"
)
HELP = ("-h", "--help")


def main(argv: list[str]) -> int:
    if argv[:1] and argv[0] in VERBS:
        module, _, function = VERBS[argv[0]][0].partition(":")
        return getattr(importlib.import_module(module), function or "main")(argv[1:])
    if argv[:1] and argv[0] not in (*OWN_VERBS, *HELP):
        raise ConfigError(
            f"unknown verb {argv[0]!r}{did_you_mean(argv[0], [*VERBS, *OWN_VERBS])}; {USAGE}"
        )
    if argv[:1] == ["config"] and any(a in HELP for a in argv[1:]):
        print(help_text(), end="")
        return 0
    if argv == ["config", "--markdown"]:
        print(markdown(), end="")
        return 0
    if argv[:1] and argv[0] in HELP:
        print(__doc__.strip())
        print("\n".join(f"    pretrain {verb:<15} {doc}" for verb, (_, doc) in VERBS.items()))
        return 0
    if argv == ["machine"]:
        import torch

        from pretrain.hardware import describe_machine

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(describe_machine(device), end="")
        return 0
    if len(argv) < 2 or argv[0] not in ("config", "check") or argv[1].startswith("--"):
        raise ConfigError(USAGE)
    show_diff = argv[0] == "config" and "--diff" in argv[2:]
    cfg = load_config(argv[1], [a for a in argv[2:] if a != "--diff" or not show_diff])
    if show_diff:
        print(diff_text(cfg), end="")
        return 0
    if argv[0] == "check":
        check_output_dir(Path(cfg.train.output_dir))
        check_data(cfg)
        check_distill(cfg)
        if cfg.logging.wandb:
            from pretrain.metrics import check_wandb

            check_wandb()
        return 0
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def console() -> None:
    """The installed `pretrain` command."""
    main_guard(lambda: main(sys.argv[1:]))


if __name__ == "__main__":
    console()
