"""python tools/convert_checkpoint.py: the `pretrain convert` command (pretrain/convert.py)."""

import sys

from pretrain.convert import main
from pretrain.errors import main_guard

if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
