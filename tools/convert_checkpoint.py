"""Convert a training checkpoint to a native or Hugging Face model folder, or import one.

    python tools/convert_checkpoint.py --checkpoint runs/demo --format hf --output out/ [--verify]
        [--tag step00000600] [--tokenizer DIR]
    python tools/convert_checkpoint.py --from-hf HF_DIR --format native --output out/

Reads DeepSpeed checkpoints of any ZeRO stage and rank count (consolidated to fp32 by
DeepSpeed's zero_to_fp32, loading with weights_only=True). `--format hf` writes an ALBERT
(albert family) or Llama (llama family) folder that transformers loads offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from pretrain.config import ModelConfig, SharingConfig, from_dict
from pretrain.errors import UserError, main_guard
from pretrain.export import hf_albert, hf_bert, hf_llama
from pretrain.export.checkpoint import TrainedModel, read_trained
from pretrain.export.common import compress
from pretrain.export.hf import export_notes, save_hf
from pretrain.export.native import load_model, save_native
from pretrain.model import SharedTransformer


def check_output(output: Path) -> None:
    if output.exists() and any(output.iterdir()):
        raise UserError(f"--output {output} is not empty; choose a new folder")


def our_model(state: dict[str, torch.Tensor], cfg: ModelConfig) -> SharedTransformer:
    model = SharedTransformer(cfg)
    model.load_state_dict(state)
    return model.eval()


def verify_batch(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, cfg.vocab_size, (2, min(32, cfg.max_position_embeddings)), generator=g)
    mask = torch.ones_like(ids)
    mask[1, ids.shape[1] // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def verify(ours: SharedTransformer, output: Path, fmt: str) -> float:
    """Largest |logit difference| between our model and the written folder, at real tokens."""
    batch = verify_batch(ours.cfg)
    expected = ours(**batch).logits
    if fmt == "native":
        got = load_model(output)(**batch).logits
    else:
        import transformers

        transformers.logging.set_verbosity_error()  # the MLM class ignores the SOP head
        auto = (
            transformers.AutoModelForCausalLM
            if ours.cfg.family == "llama"
            else transformers.AutoModelForMaskedLM
        )
        got = auto.from_pretrained(output, local_files_only=True).eval()(**batch).logits
    keep = batch["attention_mask"].bool()
    return (got[keep] - expected[keep]).abs().max().item()


def read_source(args) -> TrainedModel:
    """A native export folder, or a training checkpoint (consolidated by DeepSpeed)."""
    return read_trained(args.checkpoint, args.tag, args.tokenizer)


def export(args) -> int:
    trained = read_source(args)
    print(f"read {trained.where}: {sum(v.numel() for v in trained.state.values()):,} parameters")
    if args.format == "native":
        save_native(trained.state, trained.cfg, trained.tokenizer_dir, args.output)
    else:
        for note in export_notes(trained.cfg):
            print(note)
        save_hf(trained.state, trained.cfg, trained.tokenizer_dir, args.output)
    print(f"wrote {args.format} model to {args.output}")
    if args.verify:
        diff = verify(our_model(trained.state, trained.cfg), args.output, args.format)
        print(f"verify: max |logit diff| = {diff:.3e}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/convert_checkpoint.py", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run directory or its checkpoints/ folder")
    source.add_argument("--from-hf", help="Hugging Face ALBERT, BERT or Llama folder to import")
    parser.add_argument("--tag", help="checkpoint tag (default: latest)")
    parser.add_argument("--tokenizer", help="tokenizer folder, if not next to the shards")
    parser.add_argument("--format", choices=("native", "hf"), required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--verify", action="store_true", help="compare logits after writing")
    parser.add_argument(
        "--share", help="with --from-hf: compress into a shared model, e.g. strategy=all"
    )
    args = parser.parse_args(argv)
    check_output(args.output)
    if args.from_hf:
        return import_hf(args)
    return export(args)


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """safetensors (single or sharded) or pytorch_model.bin, never unpickling objects."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        return {k: v for f in bins for k, v in torch.load(f, weights_only=True).items()}
    raise UserError(f"{directory} holds no model.safetensors or pytorch_model.bin")


def import_hf(args) -> int:
    if args.format != "native":
        raise UserError("--from-hf imports into our format: use --format native")
    directory = Path(args.from_hf)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory} is not a Hugging Face model folder (config.json missing)")
    hf_config = json.loads(config_path.read_text())
    kind = hf_config.get("model_type")
    state = read_hf_weights(directory)
    if kind == "albert":
        sop = "sop_classifier.classifier.weight" in state
        cfg = hf_albert.config_from_hf(hf_config, sop_head=sop)
        ours = hf_albert.from_hf(state, cfg)
    elif kind == "bert":
        sop = "cls.seq_relationship.weight" in state  # NSP head -> our pair classifier
        cfg = hf_bert.config_from_hf(hf_config, sop_head=sop)
        ours = hf_bert.from_hf(state, cfg)
    elif kind == "llama":
        cfg = hf_llama.config_from_hf(hf_config)
        ours = hf_llama.from_hf(state, cfg)
    else:
        raise UserError(f"cannot import model_type {kind!r}; supported: albert, bert, llama")
    if args.share:
        ours, cfg = compress(ours, cfg, parse_share(args.share))
        print(f"compressed to {cfg.sharing.strategy} sharing: each set is the mean of its layers")
    save_native(ours, cfg, None, args.output)
    print(
        f"imported {kind} ({sum(v.numel() for v in ours.values()):,} parameters) to {args.output}"
    )
    if args.verify:
        print(
            f"verify: max |logit diff| = {verify(our_model(ours, cfg), args.output, 'native'):.3e}"
        )
    return 0


def parse_share(text: str) -> SharingConfig:
    """`strategy=sequence,num_sets=4` -> SharingConfig (checked like any config)."""
    fields = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        fields[key.strip()] = yaml.safe_load(value)
    return from_dict(SharingConfig, fields, "--share")


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
