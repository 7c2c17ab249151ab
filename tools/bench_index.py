"""Start-up cost of the sample index at scale (pretrain/data/index.py).

    python tools/bench_index.py DATA [DATA ...] [--config albert-base] [--seq-length 128]

For each data folder (e.g. tiles of the default corpus: tools/tile_shards.py), a fresh
process builds the train dataset as each rank does, twice: first with the folder's sample
index removed (the first start: it is built), then again (every later start: it is read).
Prints train tokens, build seconds, peak RSS of the process and samples/s over the first
400 samples, for both starts. The folder's index/ files are deleted for the first start.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pretrain.config import load_config
from pretrain.errors import main_guard

REPO = Path(__file__).resolve().parents[1]


def child(data: str, config: str, seq_length: int) -> dict:
    start = time.perf_counter()
    from pretrain.data.loader import PretrainDataset  # the import is part of no start here

    imported = time.perf_counter()
    cfg = load_config(
        REPO / "configs" / f"{config}.yaml",
        {"data.path": data, "data.seq_length": seq_length, "model.vocab_size": 8000},
    )
    dataset = PretrainDataset(cfg)
    built = time.perf_counter()
    for position in range(400):
        dataset[position]
    sampled = time.perf_counter()
    return {
        "tokens": dataset.shards.meta["splits"]["train"]["tokens"],
        "samples": len(dataset),
        "build_s": built - imported,
        "import_s": imported - start,
        "samples_per_s": 400 / (sampled - built),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(data: str, config: str, seq_length: int) -> dict:
    command = [sys.executable, __file__, "--child", data, "--config", config]
    command += ["--seq-length", str(seq_length)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python tools/bench_index.py", description=__doc__)
    parser.add_argument("data", nargs="+")
    parser.add_argument("--config", default="albert-base")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.data[0], args.config, args.seq_length)))
        return 0
    print(
        f"{'train tokens':>14}{'samples':>12}{'first s':>9}{'first MB':>10}{'first /s':>10}"
        f"{'later s':>9}{'later MB':>10}{'later /s':>10}"
    )
    for data in args.data:
        shutil.rmtree(Path(data) / "index", ignore_errors=True)
        first = measure(data, args.config, args.seq_length)
        later = measure(data, args.config, args.seq_length)
        print(
            f"{first['tokens']:>14,}{first['samples']:>12,}{first['build_s']:>9.2f}"
            f"{first['peak_rss_mb']:>10,.0f}{first['samples_per_s']:>10,.0f}"
            f"{later['build_s']:>9.2f}{later['peak_rss_mb']:>10,.0f}{later['samples_per_s']:>10,.0f}"
        )
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
