"""`python -m pretrain config CONFIG [--dotted.overrides]`: validate a config and print it
resolved, as YAML. The launchers run it once before starting any rank, so that a bad config
ends in one line instead of one traceback per rank."""

from __future__ import annotations

import sys

import yaml

from pretrain.config import ConfigError, load_config, main_guard, to_dict

USAGE = "usage: python -m pretrain config CONFIG [--dotted.overrides ...]"


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "config" or argv[1].startswith("--"):
        raise ConfigError(USAGE)
    cfg = load_config(argv[1], argv[2:])
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
