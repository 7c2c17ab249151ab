"""python tools/bench_train.py: the `pretrain bench` command (pretrain/bench_train.py)."""

import sys

from pretrain.bench_train import main
from pretrain.errors import main_guard

if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
