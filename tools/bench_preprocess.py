"""Preprocessing throughput and disk: one process, tokenizer processes, and parts.

    python tools/bench_preprocess.py --input CORPUS --tokenizer TOK [--num-proc 1 2]
        [--parts 2 4] [--held-out 0.05]

Each variant runs `pretrain preprocess` into a fresh folder under a temporary root: with
--num-proc C (one command, C tokenizer processes), or as N parts (N commands at once, one
tokenizer process each, as N array tasks would run them) followed by the merge. Prints the
wall time, tokens/s, the peak disk the run used under its root (sampled every 50 ms) against
the output's size, and whether every variant's folder is the same, byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pretrain.data.preprocess import same_folder
from pretrain.data.shards import read_metadata
from pretrain.errors import main_guard


def _size(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # renamed or removed while walking
            total += path.stat().st_size if path.is_file() else 0
    return total


class PeakDisk:
    """The largest total size of the files under `root` while it runs."""

    def __init__(self, root: Path) -> None:
        self.root, self.peak, self._stop = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _size(self.root))

    def __enter__(self) -> PeakDisk:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _size(self.root))


def _command(args, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pretrain", "preprocess", "--input", *args.input,
        "--tokenizer", args.tokenizer, "--output", str(output), "--held-out",
        str(args.held_out), *extra,
    ]  # fmt: skip


def _run_all(commands: list[list[str]]) -> None:
    running = [subprocess.Popen(c, stdout=subprocess.DEVNULL) for c in commands]
    if any(p.wait() for p in running):
        raise SystemExit("a preprocess command failed")


def run_variant(args, root: Path, label: str, parts: int, num_proc: int) -> dict:
    root.mkdir()
    output = root / "data"
    with PeakDisk(root) as disk:
        start = time.perf_counter()
        if parts == 1:
            _run_all([_command(args, output, "--num-proc", str(num_proc))])
        else:
            names = [root / "parts" / f"part-{i:05d}" for i in range(parts)]
            _run_all(
                [
                    _command(args, name, "--num-parts", str(parts), "--part", str(i))
                    for i, name in enumerate(names)
                ]
            )
            tokenized = time.perf_counter()
            merge = [sys.executable, "-m", "pretrain", "preprocess", "--merge"]
            _run_all([[*merge, *map(str, names), "--output", str(output)]])
        elapsed = time.perf_counter() - start
    meta = read_metadata(output)
    tokens = sum(split["tokens"] for split in meta["splits"].values())
    merge_s = elapsed - (tokenized - start) if parts > 1 else 0.0
    return {
        "label": label,
        "seconds": elapsed,
        "merge_s": merge_s,
        "tokens": tokens,
        "peak_mb": disk.peak / 2**20,
        "output_mb": _size(output) / 2**20,
        "output": output,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python tools/bench_preprocess.py", description=__doc__)
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--parts", type=int, nargs="+", default=[2])
    parser.add_argument("--held-out", type=float, default=0.05)
    args = parser.parse_args(argv)
    variants = [(f"1 command, {c} tokenizer proc", 1, c) for c in args.num_proc]
    variants += [(f"{n} parts + merge", n, 1) for n in args.parts]
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        rows = [
            run_variant(args, Path(tmp) / f"v{i}", label, parts, procs)
            for i, (label, parts, procs) in enumerate(variants)
        ]
        same = all(same_folder(rows[0]["output"], row["output"]) for row in rows[1:])
    print(f"{'variant':<28}{'seconds':>9}{'tokens/s':>12}{'merge s':>9}{'peak MB':>9}{'out MB':>8}")
    for row in rows:
        print(
            f"{row['label']:<28}{row['seconds']:>9.1f}{row['tokens'] / row['seconds']:>12,.0f}"
            f"{row['merge_s']:>9.1f}{row['peak_mb']:>9.1f}{row['output_mb']:>8.1f}"
        )
    print(f"{rows[0]['tokens']:,} tokens; every variant's folder identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
