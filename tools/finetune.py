"""python tools/finetune.py: the `pretrain finetune` command (pretrain/finetune.py)."""

import sys

from pretrain.errors import main_guard
from pretrain.finetune import main

if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
