"""python tools/check_learning.py: the `pretrain check-learning` command
(pretrain/check_learning.py)."""

import sys

from pretrain.check_learning import main
from pretrain.errors import main_guard

if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
