"""Convert a training checkpoint to a native or Hugging Face model folder, or import one.

    python tools/convert_checkpoint.py --checkpoint runs/demo --format hf --output out/ [--verify]
        [--tag step00000600] [--tokenizer DIR]
    python tools/convert_checkpoint.py --from-hf HF_DIR --format native --output out/
        [--reshare strategy=all,start=2,end=7,ratio=0.7] [--verify]

Reads DeepSpeed checkpoints of any ZeRO stage and rank count (consolidated to fp32 by
DeepSpeed's zero_to_fp32, loading with weights_only=True). `--format hf` writes the
Hugging Face format of the model's family (pretrain.export.hf.FORMATS: ALBERT for the
albert family, Llama for llama) as a folder that transformers loads offline. `--reshare`
puts an imported model under a sharing plan (`SharedTransformer.share_params`, the
same code: sets are layer means, relaxed deltas the truncated SVD of each layer's rest);
a plan the model cannot take is refused before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from pretrain.config import ModelConfig, SharingConfig, from_dict
from pretrain.data.tokenizer import MODEL_FILE
from pretrain.errors import UserError, main_guard
from pretrain.export import hf, native
from pretrain.export.card import CARD, LICENSE, RunFacts
from pretrain.export.open import open_model, read, refuse, what_is
from pretrain.export.verify import max_logit_diff
from pretrain.model.reshare import reshare

VERIFY = {"native": native.verify, "hf": hf.verify}
EXPORTS = ("run", "checkpoint", "native")
"""What --checkpoint exports."""


def check_output(output: Path) -> None:
    if output.exists() and any(output.iterdir()):
        raise UserError(f"--output {output} is not empty; choose a new folder")


def parse_reshare(text: str) -> SharingConfig:
    """`strategy=sequence,num_sets=4` -> SharingConfig (checked like any config)."""
    fields = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        fields[key.strip()] = yaml.safe_load(value)
    return from_dict(SharingConfig, fields, "--reshare")


def report_verify(state: dict[str, torch.Tensor], cfg: ModelConfig, output: Path, fmt: str) -> None:
    diff = VERIFY[fmt](native.build_model(state, cfg, str(output)), output)
    print(f"verify: max |logit diff| = {diff:.3e}")


def export(args) -> int:
    found = what_is(args.checkpoint, args.tag)
    if found.kind == "hf":
        raise UserError(
            f"--checkpoint {args.checkpoint} is a Hugging Face model folder: import it with"
            " --from-hf instead"
        )
    refuse(found, EXPORTS, "--checkpoint")
    trained = read(found, args.tokenizer)
    tokenizer = trained.tokenizer_dir
    if not (tokenizer / MODEL_FILE).is_file():  # a native import has no tokenizer of ours
        if args.format == "hf":
            raise UserError(
                f"{trained.where} has no tokenizer of ours ({tokenizer} missing) and a Hugging"
                " Face export writes one: pass --tokenizer DIR"
            )
        tokenizer = None
    print(f"read {trained.where}: {sum(v.numel() for v in trained.state.values()):,} parameters")
    if args.format == "native":
        native.save_native(trained.state, trained.cfg, tokenizer, args.output)
    else:
        for note in hf.export_notes(trained.cfg):
            print(note)
        run = trained.found.run_state
        facts = None if run is None else RunFacts.from_run(run, trained.where)
        hf.save_hf(trained.state, trained.cfg, tokenizer, args.output, facts, args.license)
        print(f"wrote the model card {args.output / CARD}")
    print(f"wrote {args.format} model to {args.output}")
    if args.verify:
        report_verify(trained.state, trained.cfg, args.output, args.format)
    return 0


def import_hf(args) -> int:
    if args.format != "native":
        raise UserError("--from-hf imports into our format: use --format native")
    opened = open_model(args.from_hf, accepts=("hf",), command="--from-hf")
    state, cfg = imported = opened.state, opened.cfg
    if args.reshare:
        state, cfg, report = reshare(state, cfg, parse_reshare(args.reshare))
        print("\n".join(report.lines()))
    native.save_native(state, cfg, None, args.output)
    parameters = sum(v.numel() for v in state.values())
    model_type = opened.found.meta["model_type"]
    print(f"imported {model_type} ({parameters:,} parameters) to {args.output}")
    if args.verify:
        report_verify(state, cfg, args.output, "native")
        if args.reshare:
            before = native.build_model(*imported, opened.where)
            diff = max_logit_diff(before, native.build_model(state, cfg, str(args.output)))
            print(f"resharing: max |logit diff| against the imported model = {diff:.3e}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/convert_checkpoint.py", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run directory or its checkpoints/ folder")
    source.add_argument(
        "--from-hf", help=f"Hugging Face model folder to import ({', '.join(hf.FORMATS)})"
    )
    parser.add_argument("--tag", help="checkpoint tag (default: latest)")
    parser.add_argument("--tokenizer", help="tokenizer folder, if not next to the shards")
    parser.add_argument("--format", choices=("native", "hf"), required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--verify", action="store_true", help="compare logits after writing")
    parser.add_argument(
        "--license", default=LICENSE, help=f"the model card's license (default: {LICENSE})"
    )
    parser.add_argument(
        "--reshare",
        "--share",  # its earlier name
        dest="reshare",
        help="with --from-hf: reshare into a sharing plan (model.sharing keys), e.g."
        " strategy=all,start=2,end=7,ratio=0.7",
    )
    args = parser.parse_args(argv)
    if args.reshare and not args.from_hf:
        raise UserError(
            "--reshare changes an imported model's sharing plan: use it with --from-hf (a"
            " trained model reshares in Python with SharedTransformer.share_params)"
        )
    check_output(args.output)
    return import_hf(args) if args.from_hf else export(args)


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
