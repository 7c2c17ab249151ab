"""Compress a trained model for inference, then report it beside the original.

    python -m pretrain.compress int8 SOURCE --output DIR [--data PATH] [--config CONFIG]
        [--eval-batches N] [--no-report] [--json] [--section.key=value ...]
    python -m pretrain.compress prune SOURCE --output DIR [--sparsity 0.5] [...]

SOURCE is a native export folder or a run directory (its newest checkpoint that verifies).
`int8` writes an int8 folder (dynamic int8 linears with per-row scales, a shared set stored
once: pretrain.export.compressed); `prune` a native export whose linear weights are
magnitude-pruned to --sparsity, each shared tensor once. The folder is written beside
--output and renamed into place, so an error leaves nothing there.

Then, unless --no-report, the four figures of pretrain.report (size, held-out quality,
compute, speed) of the compressed model beside its source, on the data of --data or
--config (with dotted overrides, e.g. --data.seq_length=64) or else of the run's own config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from pretrain.config import Config
from pretrain.data.tokenizer import MODEL_FILE, file_checksum
from pretrain.errors import UserError, main_guard
from pretrain.evaluate import held_out_batches
from pretrain.export import compressed
from pretrain.export.native import WEIGHTS
from pretrain.export.open import Opened, read, refuse, what_is

SOURCE = "a native export folder (model.safetensors and config.json) or a run directory"
TAKES = ("run", "checkpoint", "native")


def read_source(path: Path, method: str) -> Opened:
    """The fp32 model at `path`; one line naming what to pass instead when it is none."""
    found = what_is(path)
    if found.kind == "int8":
        raise UserError(
            f"SOURCE {path} is already an int8 export; {method} the fp32 model it was made from"
        )
    if found.kind == "hf":
        raise UserError(
            f"SOURCE {path} is a Hugging Face model folder; import it first (python -m pretrain"
            f" convert --from-hf {path} --format native --output DIR), then {method} DIR"
        )
    refuse(found, TAKES, f"compress {method}")
    return read(found)


def report_config(args: argparse.Namespace, overrides: list[str], trained: Opened) -> Config | None:
    """The Config whose data and objective the report evaluates on; None without one."""
    if args.no_report:
        if overrides or args.data or args.config:
            raise UserError("--data, --config and overrides choose the report's data: drop them")
        return None
    if args.config or args.data:
        from pretrain.report import eval_config

        return eval_config(args.config, args.data, overrides)
    if overrides:
        raise UserError(f"{overrides[0]}: overrides apply to --data or --config; pass one")
    if trained.kind == "native":
        raise UserError(
            f"SOURCE {args.source} is an export and carries no data to evaluate on; pass"
            " --data PATH (preprocessed shards) or --config CONFIG, or --no-report"
        )
    return trained.run_config


def check_report_data(cfg: Config, trained: Opened, eval_batches: int) -> None:
    """Before anything is written: the report's held-out data loads, fits the model's
    positions, and was tokenized with the model's tokenizer."""
    if eval_batches < 1:
        raise UserError(f"--eval-batches must be at least 1, got {eval_batches}")
    model_file = trained.tokenizer_dir / MODEL_FILE
    checksum = file_checksum(model_file) if model_file.is_file() else None
    held_out_batches(dataclasses.replace(cfg, model=trained.cfg), 1, 1, checksum)


def _tokenizer(trained: Opened) -> Path | None:
    """The tokenizer folder to copy; None for a source without one (an imported model)."""
    folder = trained.tokenizer_dir
    return folder if folder is not None and (folder / MODEL_FILE).is_file() else None


def run_int8(trained: Opened, args: argparse.Namespace) -> dict:
    model = trained.build()
    count = compressed.quantize_int8(model)
    compressed.save_int8(model, trained.cfg, _tokenizer(trained), args.output, trained.where)
    return {"method": "int8", "source": trained.where, "quantized_linears": count}


def run_prune(trained: Opened, args: argparse.Namespace) -> dict:
    model = trained.build()
    pruned = compressed.prune(model, args.sparsity)
    summary = {
        "method": "prune",
        "sparsity": args.sparsity,
        "source": trained.where,
        "achieved": pruned["achieved"],
        "pruned_tensors": len(pruned["tensors"]),
        "zeros": pruned["zeros"],
        "entries": pruned["numel"],
    }
    compressed.save_pruned(model, _tokenizer(trained), args.output, summary)
    return summary


METHODS: dict[str, Callable[[Opened, argparse.Namespace], dict]] = {
    "int8": run_int8,
    "prune": run_prune,
}


def describe(summary: dict, output: Path) -> str:
    size = (output / WEIGHTS).stat().st_size / 1e6
    if summary["method"] == "int8":
        did = f"quantized {summary['quantized_linears']} distinct linears to int8"
    else:
        did = (
            f"pruned {summary['pruned_tensors']} distinct linear weights to sparsity"
            f" {summary['achieved']:.4f} ({summary['zeros']:,} of {summary['entries']:,} zero)"
        )
    return f"{did}; wrote {output} ({WEIGHTS}: {size:.2f} MB)"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.compress", description=__doc__.split("\n")[0]
    )
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("source", metavar="SOURCE", help=SOURCE)
    parser.add_argument("--output", required=True, type=Path, help="a new folder")
    parser.add_argument("--sparsity", type=float, help="prune: fraction of zeros (default 0.5)")
    parser.add_argument("--data", help="preprocessed shards the report evaluates on")
    parser.add_argument("--config", help="YAML whose data and objective the report uses")
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out batches of 32")
    parser.add_argument("--no-report", action="store_true", help="only compress")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, overrides = parser.parse_known_args(argv)
    if args.method == "int8" and args.sparsity is not None:
        raise UserError("--sparsity applies to prune; int8 keeps every weight")
    if args.method == "prune":
        args.sparsity = 0.5 if args.sparsity is None else args.sparsity
        compressed.check_sparsity(args.sparsity)
    return args, overrides


def main(argv: list[str]) -> int:
    args, overrides = parse(argv)
    compressed.check_output(args.output)
    trained = read_source(Path(args.source), args.method)
    cfg = report_config(args, overrides, trained)
    if cfg is not None:
        check_report_data(cfg, trained, args.eval_batches)
    summary = METHODS[args.method](trained, args)
    rows = None
    if cfg is not None:
        from pretrain.report import markdown, report

        rows = report([args.source, str(args.output)], cfg, eval_batches=args.eval_batches)
    if args.json:
        print(json.dumps({"compression": summary, "output": str(args.output), "report": rows}))
    else:
        print(describe(summary, args.output))
        if rows is not None:
            print(markdown(rows))
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
