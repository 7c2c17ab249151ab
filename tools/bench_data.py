"""Data pipeline benchmark on the default corpus: preprocessing, and whether one loader
process keeps a GPU fed.

    python tools/bench_data.py [CONFIG ...] [--seq-length T] [--gpu h100] [--mfu 0.5]
        [--workdir data/bench] [--num-proc 2] [--no-preprocess] [--data DIR]

Prints preprocessing throughput (tokens/s with 1 and --num-proc processes) and, for each
CONFIG (default: albert-base.yaml at T 128 and 512, llama-small.yaml at 512), the samples/s
one loader process builds (the trainer's own path: order, sample, mask, collate; one
thread), beside the samples/s one GPU consumes: its datasheet bf16 peak times --mfu over
the config's training FLOPs per token (pretrain.model.accounting), and so how many loader
processes (`data.num_workers`) it needs. `--data DIR` times the loader on that data folder
(e.g. a tile of the corpus: tools/tile_shards.py) instead, with no preprocessing.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain.config import ConfigError, load_config
from pretrain.data.corpus import copy_default_corpus
from pretrain.data.loader import PretrainDataset, make_loader
from pretrain.data.preprocess import preprocess
from pretrain.data.shards import read_metadata
from pretrain.data.sources import ReadReport, iter_documents
from pretrain.data.tokenizer import info_file, train_tokenizer
from pretrain.errors import main_guard
from pretrain.metrics import PEAK_TFLOPS, peak_tflops
from pretrain.model.accounting import account

REPO = Path(__file__).resolve().parents[1]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_preprocess(corpus: Path, tokenizer: Path, num_proc: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory(dir=corpus.parent) as tmp:
        meta, seconds = timed(
            lambda: preprocess([str(corpus)], tokenizer, Path(tmp) / "out", num_proc=num_proc)
        )
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    return tokens, seconds


def resolve_config(name: str) -> Path:
    path = Path(name)
    if not path.is_file() and (REPO / "configs" / name).is_file():
        path = REPO / "configs" / name
    if not path.is_file():
        raise ConfigError(f"no config {name!r} (a path, or a file name in configs/)")
    return path


def bench_loader(path: Path, shards: Path, seq_length: int | None, batches: int) -> dict:
    """Samples/s of the trainer's loader for `path` (its micro-batch) in this process."""
    vocab = read_metadata(shards)["tokenizer"]["vocab_size"]
    cfg = load_config(path, {"data.path": str(shards)})
    T = seq_length or cfg.data.seq_length
    cfg.data.seq_length = T
    cfg.model.vocab_size = max(cfg.model.vocab_size, vocab)
    cfg.model.max_position_embeddings = max(cfg.model.max_position_embeddings, T)
    dataset, init_s = timed(lambda: PretrainDataset(cfg))
    micro = cfg.engine.micro_batch_size
    loader = iter(make_loader(dataset, 0, micro))
    next(loader)  # the first batch maps the epoch's order
    # The median of 5 rounds: a shared machine's noise moves single rounds by 2x.
    rounds = [timed(lambda: [next(loader) for _ in range(batches)])[1] for _ in range(5)]
    load_s = statistics.median(rounds)
    return {
        "config": path.name,
        "objective": "causal" if cfg.model.causal else "MLM+SOP",
        "seq_length": T,
        "micro": micro,
        "init_s": init_s,
        "samples_per_s": batches * micro / load_s,
        "flops_per_token": account(cfg).flops_per_token,
    }


def gpu_samples_per_s(gpu: str, mfu: float, flops_per_token: float, seq_length: int) -> float:
    peak = peak_tflops(gpu, "bf16")
    if peak is None:
        known = ", ".join(k.lower() for k in PEAK_TFLOPS if "bf16" in PEAK_TFLOPS[k])
        raise ConfigError(f"--gpu {gpu!r} has no bf16 datasheet peak here; one of: {known}")
    return peak * 1e12 * mfu / flops_per_token / seq_length


def default_shards(work: Path, num_proc: int, no_preprocess: bool) -> Path:
    """The default corpus, a tokenizer and shards under `work`; preprocessing is timed with
    1 and `num_proc` processes first unless `no_preprocess` (then shards already there are
    kept)."""
    corpus, tokenizer, shards = work / "corpus", work / "tokenizer", work / "shards"
    copy_default_corpus(corpus)
    if not info_file(tokenizer).exists():
        docs = iter_documents([corpus], "text", ReadReport())
        _, seconds = timed(lambda: train_tokenizer(docs, tokenizer, vocab_size=8000))
        print(f"tokenizer: unigram 8000 trained in {seconds:.1f}s")
    if not no_preprocess:
        print("== preprocessing (default corpus, reading + tokenizing + writing shards)")
        for procs in sorted({1, num_proc}):
            tokens, seconds = bench_preprocess(corpus, tokenizer, procs)
            print(
                f"num_proc {procs}: {tokens:,} tokens in {seconds:.2f}s"
                f" = {tokens / seconds:,.0f} tokens/s"
            )
    if not no_preprocess or not shards.exists():
        if shards.exists():
            shutil.rmtree(shards)
        preprocess([str(corpus)], tokenizer, shards, num_proc=num_proc)
    return shards


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/bench_data.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("configs", nargs="*", help="configs whose loader to time")
    parser.add_argument("--seq-length", type=int, help="instead of each config's own")
    parser.add_argument("--gpu", default="h100", help="the GPU to feed (datasheet bf16 peak)")
    parser.add_argument("--mfu", type=float, default=0.5, help="the MFU that GPU trains at")
    parser.add_argument("--batches", type=int, default=20, help="micro-batches a round")
    parser.add_argument("--workdir", default="data/bench", help="corpus, tokenizer and shards")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--no-preprocess", action="store_true", help="time the loader only")
    parser.add_argument("--data", help="a preprocessed data folder to time the loader on")
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu} must be in (0, 1]")
    torch.set_num_threads(1)
    if args.data:
        shards = Path(args.data)
        read_metadata(shards)  # one clear error for a folder that holds no shards
    else:
        shards = default_shards(Path(args.workdir), args.num_proc, args.no_preprocess)
    runs = (
        [(resolve_config(c), args.seq_length) for c in args.configs]
        if args.configs
        else [
            (REPO / "configs" / "albert-base.yaml", 128),
            (REPO / "configs" / "albert-base.yaml", 512),
            (REPO / "configs" / "llama-small.yaml", 512),
        ]
    )
    print(
        f"== loader: one process, one thread, against one {args.gpu.upper()} at"
        f" {args.mfu:.0%} MFU (bf16 datasheet peak)"
    )
    print(
        f"{'config':<20}{'objective':<10}{'T':>5}{'batch':>6}{'samples/s':>11}"
        f"{'GFLOP/token':>12}{'GPU samples/s':>14}{'loaders/GPU':>12}"
    )
    for path, seq_length in runs:
        r = bench_loader(path, shards, seq_length, args.batches)
        need = gpu_samples_per_s(args.gpu, args.mfu, r["flops_per_token"], r["seq_length"])
        print(
            f"{r['config']:<20}{r['objective']:<10}{r['seq_length']:>5}{r['micro']:>6}"
            f"{r['samples_per_s']:>11,.0f}{r['flops_per_token'] / 1e9:>12.3f}"
            f"{need:>14,.0f}{math.ceil(need / r['samples_per_s']):>12}"
        )
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
