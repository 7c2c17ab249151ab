"""python tools/preprocess.py: the `pretrain preprocess` command (pretrain/prepare.py)."""

import sys

from pretrain.errors import main_guard
from pretrain.prepare import preprocess_main

if __name__ == "__main__":
    main_guard(lambda: preprocess_main(sys.argv[1:]))
