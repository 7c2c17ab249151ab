"""Commands run before any rank starts, so that a mistake ends in one line instead of one
traceback per rank:

    python -m pretrain config CONFIG [--dotted.overrides]   the config, resolved, as YAML
    python -m pretrain config CONFIG --diff [...]           only what differs from the defaults
    python -m pretrain config --help                        every key: type, default, doc
    python -m pretrain check CONFIG [--dotted.overrides]    also what the run reads and writes
    python -m pretrain machine                              CPU class / GPU, matmul peaks,
                                                            what engine.precision=auto runs

`check` (the launchers run it) validates the config, then makes sure train.output_dir is a
writable directory, that the data, its tokenizer and its shard indexes load, and that a
distillation teacher (distill.teacher) loads with the student's tokenizer and vocabulary.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from pretrain.config import ConfigError, load_config, to_dict
from pretrain.config.reference import diff_text, help_text
from pretrain.errors import main_guard
from pretrain.preflight import check_data, check_distill, check_output_dir

# torch is imported only by the commands that need it: the launchers run `check` before
# every job, and importing torch there would cost more than the check itself.

USAGE = (
    "usage: python -m pretrain (config | check) CONFIG [--dotted.overrides ...];"
    " python -m pretrain config --help lists every key; python -m pretrain machine"
)
HELP = ("-h", "--help")


def main(argv: list[str]) -> int:
    if argv[:1] == ["config"] and any(a in HELP for a in argv[1:]):
        print(help_text(), end="")
        return 0
    if argv[:1] and argv[0] in HELP:
        print(__doc__.strip())
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


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
