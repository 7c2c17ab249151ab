"""Tile preprocessed shards for scaling benchmarks (pretrain/data/tile.py).

python tools/tile_shards.py SOURCE OUTPUT --times K
"""

import argparse
import sys

from pretrain.data.tile import tile_shards
from pretrain.errors import main_guard


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python tools/tile_shards.py", description=__doc__)
    parser.add_argument("source", help="a preprocessed data folder")
    parser.add_argument("output", help="a new folder")
    parser.add_argument("--times", type=int, required=True, help="copies of the train split")
    args = parser.parse_args(argv)
    meta = tile_shards(args.source, args.output, args.times)
    train = meta["splits"]["train"]
    print(f"wrote {args.output}: {train['tokens']:,} train tokens in {len(train['shards'])} shards")
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
