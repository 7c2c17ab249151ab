"""python tools/sweep.py: the `pretrain sweep` command (pretrain/study.py)."""

import sys

from pretrain.errors import main_guard
from pretrain.study import main

if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
