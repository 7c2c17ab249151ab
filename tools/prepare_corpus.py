"""python tools/prepare_corpus.py: the `pretrain prepare-corpus` command (pretrain/prepare.py)."""

import sys

from pretrain.errors import main_guard
from pretrain.prepare import corpus_main

if __name__ == "__main__":
    main_guard(lambda: corpus_main(sys.argv[1:]))
