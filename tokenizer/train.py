"""python tokenizer/train.py: the `pretrain tokenizer` command (pretrain/prepare.py)."""

import sys

from pretrain.errors import main_guard
from pretrain.prepare import tokenizer_main

if __name__ == "__main__":
    main_guard(lambda: tokenizer_main(sys.argv[1:]))
