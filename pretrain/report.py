"""The four figures of trained models, side by side: size, held-out quality, training
compute, and inference speed on this machine.

python -m pretrain.report RUN_OR_EXPORT [RUN_OR_EXPORT ...] [--data PATH] [--config CONFIG]
    [--eval-batches N] [--tokenizer DIR] [--json] [--section.key=value ...]

(dotted overrides refine the evaluation config of --config/--data)

Each path is a run directory, checkpoints folder or one checkpoint's folder, a native
export, a Hugging Face model folder, or an int8 export (pretrain.export.open). Per model:

- size: unique and effective parameters (every application of a shared layer counts in
  effective), nonzero entries of the weights (pruning shows here), and the bytes of its
  weight files (for a checkpoint: what a native export of its fp32 weights would take);
- quality: held-out loss and accuracy of the masked token (albert family) or the next token
  (llama), weighted by targets, beside the unigram baseline of the training split on the
  same targets;
- compute: training FLOPs per token (forward + backward at the config's seq_length) and
  forward FLOPs per token of inference (token logits at every position);
- speed: median forward latency at batch 1 and tokens per second at the eval batch size,
  in fp32 on CPU with torch's threads.

A run is evaluated on its own config's data unless --config or --data is given; exports
need one of them. With either, every model is evaluated on the same held-out batches,
masked alike, so their figures compare; the model section always comes from the model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as QLinear

from pretrain.config import Config, ModelConfig, load_config
from pretrain.data.tokenizer import MODEL_FILE, file_checksum
from pretrain.errors import UserError, main_guard
from pretrain.evaluate import baseline, evaluate, held_out_batches
from pretrain.export import native
from pretrain.export.open import open_model
from pretrain.model import SharedTransformer, SharingPlan, count
from pretrain.model.accounting import TRAIN_FLOPS_PER_FORWARD, predicted_fraction
from pretrain.objectives import model_inputs

WEIGHT_FILES = ("*.safetensors", "*.bin")
"""What counts as a model folder's weights on disk (not its tokenizer or config)."""
TIMING_S = 1.0
"""Seconds each speed figure keeps repeating its forward for, after the warm-up."""
MIN_REPEATS, MAX_REPEATS = 3, 1000

COLUMNS = {
    "name": "model",
    "family": "family",
    "plan": "sharing",
    "objective": "task",
    "seq_length": "T",
    "unique_params": "unique",
    "effective_params": "effective",
    "nonzero_params": "nonzero",
    "disk_bytes": "disk MB",
    "eval_loss": "loss",
    "eval_acc": "acc",
    "eval_targets": "targets",
    "baseline_loss": "unigram loss",
    "baseline_acc": "unigram acc",
    "train_flops_per_token": "train FLOPs/tok",
    "latency_ms": "latency ms (B=1)",
    "throughput_tokens_per_s": "tokens/s",
}
"""The markdown table: figure key -> column header."""
TEXT_COLUMNS = ("name", "family", "plan", "objective")
"""Left-aligned; the numbers are right-aligned."""


@dataclass
class Loaded:
    """A model ready for the report, with what its folder says about it."""

    model: nn.Module
    """In eval mode, on CPU."""
    model_cfg: ModelConfig
    run_cfg: Config | None
    """The config a run trained with; None for an export."""
    disk_bytes: int
    nonzero_params: int
    name: str
    path: str
    kind: str = "native"
    """What the folder is: pretrain.export.open.KINDS."""
    tokenizer_checksum: str | None = None
    """Of the tokenizer the model was trained with, where its folder says so."""


# -- loading ----------------------------------------------------------------------------------


def weight_file_bytes(path: Path) -> int:
    """Bytes of the weight files directly in the folder `path`."""
    files = {f for pattern in WEIGHT_FILES for f in path.glob(pattern) if f.is_file()}
    return sum(f.stat().st_size for f in files)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors of one state-dict entry: a quantized one as its integers, and both of
    the (weight, bias) pair a dynamic int8 Linear packs into one entry."""
    if isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, torch.Tensor):
        yield value.int_repr() if value.is_quantized else value


def count_nonzero(model: nn.Module) -> int:
    """Nonzero entries over the weights of the model's state dict: an int8 Linear's integer
    weight and its bias, not the output scale and zero point that dynamic quantization
    stores but never uses."""
    unused = {
        f"{name}.{key}"
        for name, m in model.named_modules()
        if isinstance(m, QLinear)
        for key in ("scale", "zero_point")
    }
    state = {k: v for k, v in model.state_dict().items() if k not in unused}
    return sum(int(torch.count_nonzero(t)) for v in state.values() for t in _tensors(v))


def _tokenizer_checksum(path: Path) -> str | None:
    """The checksum of the SentencePiece model a folder carries (a native export's
    tokenizer/ or an HF folder's own), if any."""
    for model_file in (path / native.TOKENIZER / MODEL_FILE, path / MODEL_FILE):
        if model_file.is_file():
            return file_checksum(model_file)
    return None


def load_for_report(path: str | Path, tokenizer: str | Path | None = None) -> Loaded:
    """Any model folder the stack reads, in eval mode on CPU, with its size on disk.

    `tokenizer`: the training tokenizer of a checkpoint whose run no longer finds it."""
    folder = Path(path)
    opened = open_model(folder, tokenizer=tokenizer, command="report")
    model, kind = opened.build(), opened.kind
    run_cfg, checksum = None, _tokenizer_checksum(folder)
    if kind in ("run", "checkpoint"):
        # What `export --format native` would write of its fp32 weights.
        state = {k: v.contiguous() for k, v in opened.state.items()}
        disk = len(safetensors_bytes(state, {"format": native.FORMAT}))
        run_cfg = opened.run_config
        checksum = file_checksum(opened.tokenizer_dir / MODEL_FILE)
    else:
        disk = weight_file_bytes(folder)
    return Loaded(
        model=model,
        model_cfg=model.cfg,
        run_cfg=run_cfg,
        disk_bytes=disk,
        nonzero_params=count_nonzero(model),
        name=folder.resolve().name,
        path=str(path),
        kind=kind,
        tokenizer_checksum=checksum,
    )


# -- measuring --------------------------------------------------------------------------------


def compute(cfg: Config) -> dict[str, float | int]:
    """Parameters and FLOPs per token of `cfg.model` (built on the meta device)."""
    with torch.device("meta"):
        model = SharedTransformer(cfg.model)
    T = cfg.data.seq_length
    train = count(model, T, predicted_fraction(cfg))
    # Inference as the speed figures run it: token logits at every position, forward only.
    infer = count(model, T, 1.0)
    return {
        "unique_params": train.unique_params,
        "effective_params": train.effective_params,
        "train_flops_per_token": train.flops_per_token,
        "infer_flops_per_token": infer.flops_per_token / TRAIN_FLOPS_PER_FORWARD,
    }


def median_seconds(fn: Callable[[], Any], budget_s: float) -> float:
    """Median wall time of `fn` after one warm-up call, repeated until `budget_s` has passed
    (at least MIN_REPEATS times), so that a small model gets many samples and a big one
    few."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_REPEATS or (
        time.perf_counter() - start < budget_s and len(times) < MAX_REPEATS
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def speed(model: nn.Module, batch: dict[str, torch.Tensor], timing_s: float) -> dict[str, float]:
    """Forward latency at batch 1 and throughput at the batch's size: full sequences with
    token logits at every position, as an inference server computes them."""
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "predict_mask"}
    one = {k: None if v is None else v[:1] for k, v in inputs.items()}
    B, T = batch["input_ids"].shape
    latency = median_seconds(lambda: model(**one), timing_s)
    per_batch = median_seconds(lambda: model(**inputs), timing_s)
    return {
        "latency_ms": latency * 1e3,
        "throughput_tokens_per_s": B * T / per_batch,
        "threads": torch.get_num_threads(),
    }


def measure(
    loaded: Loaded,
    cfg: Config,
    *,
    eval_batches: int = 16,
    batch_size: int = 32,
    timing_s: float = TIMING_S,
) -> dict[str, Any]:
    """Every figure of `loaded` on the data and objective of `cfg` (its model section is
    replaced by the model's own), as one flat JSON-able dict."""
    if eval_batches < 1 or batch_size < 1:
        raise UserError(
            f"eval batches ({eval_batches}) and batch size ({batch_size}) must be at least 1;"
            " e.g. --eval-batches 16"
        )
    cfg = dataclasses.replace(cfg, model=loaded.model_cfg)
    model = loaded.model.eval()  # no dropout: the figures are the model's, not a sample
    batches, dataset = held_out_batches(cfg, eval_batches, batch_size, loaded.tokenizer_checksum)
    return {
        "name": loaded.name,
        "path": loaded.path,
        "kind": loaded.kind,
        "family": loaded.model_cfg.family,
        "plan": SharingPlan.from_config(loaded.model_cfg).description,
        "seq_length": cfg.data.seq_length,
        "objective": cfg.model.spec.objective,
        **compute(cfg),
        "nonzero_params": loaded.nonzero_params,
        "disk_bytes": loaded.disk_bytes,
        **evaluate(model, batches, cfg),
        **baseline(batches, dataset, cfg),
        **speed(model, batches[0], timing_s),
    }


def eval_config(config: str | None, data: str | None, overrides: list[str]) -> Config:
    """The evaluation config of --config and --data, with dotted overrides."""
    extra = [f"--data.path={data}"] if data else []
    return load_config(config, [*overrides, *extra])


def _config_for(loaded: Loaded, cfg: Config | None) -> Config:
    if cfg is not None:
        return cfg
    if loaded.run_cfg is None:
        raise UserError(
            f"{loaded.path} is an export and carries no data to evaluate on; pass --data PATH"
            " (preprocessed shards) or --config CONFIG"
        )
    return loaded.run_cfg


def report(
    paths: list[str],
    cfg: Config | None = None,
    *,
    eval_batches: int = 16,
    tokenizer: str | Path | None = None,
    timing_s: float = TIMING_S,
) -> list[dict]:
    """Load and measure each model of `paths`, one at a time: each on the data and
    objective of `cfg`, or without it, each run on its own config."""
    rows = []
    for path in paths:
        loaded = load_for_report(path, tokenizer)
        eval_cfg = _config_for(loaded, cfg)
        rows.append(measure(loaded, eval_cfg, eval_batches=eval_batches, timing_s=timing_s))
    return rows


# -- printing ---------------------------------------------------------------------------------


def _cell(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if key == "disk_bytes":
        return f"{value / 1e6:.2f}"
    if key.endswith(("_params", "_targets")) or key == "seq_length":
        return f"{value:,}"
    if key.endswith(("_loss", "_acc")):
        return f"{value:.4f}"
    if key == "latency_ms":
        return f"{value:.2f}"
    return f"{value:,.0f}" if key == "throughput_tokens_per_s" else f"{value:.3g}"


def markdown(rows: list[dict]) -> str:
    """One markdown table, one row per model."""
    lines = [
        "| " + " | ".join(COLUMNS.values()) + " |",
        "|" + "|".join("---" if k in TEXT_COLUMNS else "---:" for k in COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(k, row[k]) for k in COLUMNS) + " |")
    if rows:
        lines.append(
            "\nloss/acc: held-out masked (mlm) or next (clm) token; unigram: training token"
            f" frequencies on the same targets; speed: fp32 CPU forward, {rows[0]['threads']}"
            " threads"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.report",
        description="Size, held-out quality, compute and speed of trained models.",
    )
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_EXPORT")
    parser.add_argument("--data", help="preprocessed shards to evaluate on (data.path)")
    parser.add_argument("--config", help="YAML whose data and objective sections are used")
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out batches of 32")
    parser.add_argument("--tokenizer", help="training tokenizer of a checkpoint, if moved")
    parser.add_argument("--json", action="store_true", help="print one JSON list")
    args, overrides = parser.parse_known_args(argv)
    cfg = None
    if args.config or args.data:
        cfg = eval_config(args.config, args.data, overrides)
    elif overrides:
        raise UserError(
            f"{' '.join(overrides)}: dotted overrides change the evaluation config; pass them"
            " with --config CONFIG or --data PATH (a run without them is evaluated on its own)"
        )
    # DeepSpeed, imported to read a checkpoint, logs to stdout: keep stdout for the report.
    with contextlib.redirect_stdout(sys.stderr):
        rows = report(
            args.paths,
            cfg,
            eval_batches=args.eval_batches,
            tokenizer=args.tokenizer,
        )
    print(json.dumps(rows) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
