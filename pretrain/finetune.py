"""Fine-tune a Hugging Face model (e.g. an ALBERT export) as a text classifier.

    python tools/finetune.py --model HF_DIR --train train.csv --eval eval.jsonl --output DIR
        [--text-field text] [--label-field label] [--epochs 3] [--lr 5e-5]
        [--batch-size 16] [--max-length 128] [--seed 0]
        [--layer-decay 0.8] [--freeze-embeddings] [--freeze-layers N]
        [--tie-penalty W [--tie-sets 0,0,1,1]]

--train/--eval are .csv or .jsonl files; labels (ints or strings) get ids in sorted order.
DIR receives the fine-tuned model, its tokenizer and eval_results.json.

Depth, for ALBERT, BERT and Llama folders: the embeddings are -1, layer application i of
L is i, the head (pooler, final norm, classifier) is L. A parameter set that several layer
applications run (an ALBERT group; with num_hidden_groups=1 one group runs every layer)
takes the depth of its highest use. With it:

- layer-wise learning-rate decay: a parameter of depth d trains at lr * decay^(L - d), so
  the head gets lr, the top layer lr * decay, the embeddings lr * decay^(L + 1);
- freezing: --freeze-embeddings, and --freeze-layers N freezes the parameters of depth
  below N; a shared set is thus frozen only when every layer application that runs it is;
- --tie-penalty W adds W * sum_i ||P_i - mean P||^2 over the layers of each tie set (every
  parameter of the layer, by name): the soft sharing of a relaxed model, whose export is
  unrolled and no longer knows which layers shared a set or what the shared weights were,
  so --tie-sets says it (the set of each layer, - for none; default: all layers one set)
  and the set's mean stands in for its shared weights.

Afterwards:

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained("DIR")
    model = AutoModelForSequenceClassification.from_pretrained("DIR")
    logits = model(**tok(["some text"], return_tensors="pt")).logits
    print(model.config.id2label[int(logits.argmax(-1))])
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Everything this tool reads is local: never let a typo in --model turn into a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pretrain.data.sources import DataError
from pretrain.errors import UserError, main_guard
from pretrain.export.hf import FORMATS
from pretrain.export.open import KINDS, kind_of
from pretrain.pickles import refusing_pickles

Tokenizer = transformers.PreTrainedTokenizerBase
READERS = {".csv": "csv", ".jsonl": "json", ".json": "json"}


def read_table(path: Path, flag: str) -> datasets.Dataset:
    """The rows of a local CSV or JSON-lines file; `flag` names it in errors."""
    if not path.is_file():
        raise DataError(f"{flag} {path}: no such file")
    if path.suffix.lower() not in READERS:
        raise DataError(f"{flag} {path}: expected a .csv, .jsonl or .json file")
    if path.stat().st_size == 0:
        raise DataError(f"{flag} {path} is empty")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our error line says it once
    try:
        ds = datasets.load_dataset(
            READERS[path.suffix.lower()], data_files=str(path), split="train"
        )
    except (ValueError, OSError, StopIteration, datasets.exceptions.DatasetsError) as err:
        if "corresponds to no data" in str(err):  # a CSV with only a header
            raise DataError(f"{flag} {path} has no rows") from None
        cause = str(err.__cause__ or err).splitlines()[0]  # datasets wraps the parser's error
        raise DataError(f"cannot read {flag} {path}: {cause}") from None
    if len(ds) == 0:
        raise DataError(f"{flag} {path} has no rows")
    return ds


def column(ds: datasets.Dataset, name: str, field_flag: str, where: str) -> list:
    """One column's values; a missing column or a missing value is an error saying which."""
    if name not in ds.column_names:
        raise DataError(
            f"{where} has no column {name!r} (columns: {', '.join(ds.column_names)});"
            f" pass {field_flag} NAME"
        )
    values = ds[name]
    if None in values:
        raise DataError(f"{where} row {values.index(None)} has no {name!r} value")
    return values


def label_ids(train: list, evaluation: list, where: str) -> dict[str, int]:
    """Sorted training labels -> ids. Keys are strings so that 1 in a CSV and "1" in a
    JSONL name the same class."""
    names = [str(label) for label in sorted(set(train))]
    if len(names) < 2:
        raise DataError(f"--train has a single label ({names[0]}); a classifier needs two or more")
    unseen = sorted({str(label) for label in evaluation} - set(names))
    if unseen:
        raise DataError(
            f"{where} has label(s) {', '.join(unseen)} that never occur in --train"
            f" (training labels: {', '.join(names)})"
        )
    return {name: i for i, name in enumerate(names)}


def encode(
    tok: Tokenizer, split: tuple[list, list], ids: dict[str, int], length: int
) -> datasets.Dataset:
    texts, labels = split
    enc = tok([str(t) for t in texts], truncation=True, max_length=length)
    return datasets.Dataset.from_dict({**enc, "labels": [ids[str(y)] for y in labels]})


def accuracy(pred: transformers.EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


# -- depth of each parameter: layer-wise learning rates, freezing, tie penalty ---------------


@dataclass(frozen=True)
class Layout:
    """Where each parameter of a classifier sits (names as `named_parameters` gives them)."""

    num_layers: int
    """L, the layer applications of a forward pass."""
    depth: dict[str, int]
    """-1 for the embeddings, the highest layer application that runs it for a layer
    parameter, L for the head."""
    uses: dict[int, tuple[int, ...]]
    """Layer parameter set -> the layer applications that run it."""
    members: dict[str, tuple[int, str]]
    """Layer parameter -> (its set, its name inside the set)."""

    def applications(self, depth: int) -> tuple[int, ...]:
        """The layer applications that run the sets of `depth`."""
        return tuple(i for uses in self.uses.values() if max(uses) == depth for i in uses)

    def label(self, depth: int) -> str:
        if depth < 0:
            return "embeddings"
        if depth == self.num_layers:
            return "head"
        uses = self.applications(depth)
        return f"layer {depth}" if uses == (depth,) else f"layers {spans(uses)} (shared set)"


def spans(numbers: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2, 5"."""
    out, ordered = [], sorted(set(numbers))
    for n in ordered:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def layout(model: transformers.PreTrainedModel, needed_by: str) -> Layout:
    """The depth of every parameter; a model_type without a known layout is an error naming
    `needed_by` (the flags that need it)."""
    model_type = model.config.model_type
    fmt = FORMATS.get(model_type)
    if fmt is None or not fmt.layers:
        known = [t for t, f in FORMATS.items() if f.layers]
        raise UserError(
            f"{needed_by} needs a model whose layers this tool knows ({', '.join(known)});"
            f" --model is {model_type!r}: fine-tune it without them"
        )
    embeddings, layer, config = fmt.embeddings, fmt.layers, model.config.to_dict()
    L = model.config.num_hidden_layers
    depth, uses, members = {}, {}, {}
    for name, _ in model.named_parameters():
        found = re.match(layer, name)
        if re.match(embeddings, name):
            depth[name] = -1
        elif found:
            index = int(found.group(1))
            uses[index] = fmt.set_uses(config, index)
            members[name] = index, found.group(2)
            depth[name] = max(uses[index])
        else:
            depth[name] = L
    return Layout(L, depth, uses, members)


def freeze(
    model: transformers.PreTrainedModel, where: Layout, embeddings: bool, layers: int
) -> list[str]:
    """Turn off the gradients of the embeddings (if `embeddings`) and of every parameter of
    depth below `layers`; returns what it did, in words."""
    if layers > where.num_layers:
        raise UserError(
            f"--freeze-layers {layers}: the model has {where.num_layers} layer applications;"
            f" freeze at most {where.num_layers}"
        )
    frozen = set()
    for name, param in model.named_parameters():
        d = where.depth[name]
        if (d < 0 and embeddings) or 0 <= d < layers:
            param.requires_grad_(False)
            frozen.add(d)
    lines = [f"frozen: {where.label(d)}" for d in sorted(frozen)]
    kept = {max(u) for u in where.uses.values() if min(u) < layers <= max(u)}
    lines += [
        f"trainable: {where.label(d)}, also run by a layer above the first {layers}"
        for d in sorted(kept)
    ]
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return [*lines, f"training {trained:,} of {total:,} parameters"]


def param_groups(
    model: torch.nn.Module, where: Layout | None, lr: float, decay: float
) -> list[dict]:
    """One optimizer group per depth holding the trainable parameters of that depth, at
    lr * decay^(L - depth); without a layout, one group at lr. Each parameter is in one."""
    groups: dict[int, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        d = 0 if where is None else where.depth[name]
        if d not in groups:
            scale = 1.0 if where is None else decay ** (where.num_layers - d)
            label = "all" if where is None else where.label(d)
            groups[d] = {"params": [], "lr": lr * scale, "name": label}
        groups[d]["params"].append(param)
    return [groups[d] for d in sorted(groups)]


def parse_tie_sets(text: str | None, num_layers: int) -> list[int | None]:
    """The tie set of each layer from `--tie-sets` ("0,0,1,1", - for a layer in no set);
    without it, every layer in one set (a relaxed `all` plan)."""
    if text is None:
        return [0] * num_layers
    items = [item.strip() for item in text.split(",")]
    if len(items) != num_layers or not all(i == "-" or i.isdigit() for i in items):
        raise UserError(
            f"--tie-sets {text}: give the set of each of the {num_layers} layers, comma"
            " separated (a number, or - for none), e.g. " + ",".join(["0"] * num_layers)
        )
    return [None if i == "-" else int(i) for i in items]


def tie_groups(
    model: torch.nn.Module, where: Layout, sets: list[int | None]
) -> list[list[torch.nn.Parameter]]:
    """For each tie set and parameter name, the parameter each of its layers runs. An error
    when no tie set spans two parameter sets: the penalty would be zero forever."""
    params = dict(model.named_parameters())
    by_set = {(s, inner): params[name] for name, (s, inner) in where.members.items()}
    set_of = {i: s for s, uses in where.uses.items() for i in uses}
    ties = []
    for tie in sorted({t for t in sets if t is not None}):
        layers = [i for i, t in enumerate(sets) if t == tie]
        if len({set_of[i] for i in layers}) < 2:
            continue  # these layers already run one set: nothing to tie
        inner_names = sorted({inner for s, inner in by_set if s == set_of[layers[0]]})
        ties += [[by_set[set_of[i], inner] for i in layers] for inner in inner_names]
    if not ties:
        raise UserError(
            "--tie-penalty: no tie set holds layers with parameters of their own (the layers"
            " of each already share one set), so there is nothing to tie; leave it out"
        )
    return ties


def tie_penalty(ties: list[list[torch.nn.Parameter]]) -> torch.Tensor:
    """sum over tied parameters of sum_i ||P_i - mean P||^2 (zero when the layers agree)."""
    total = 0.0
    for tied in ties:
        stacked = torch.stack(list(tied))
        total = total + (stacked - stacked.mean(0)).square().sum()
    return total


class FineTuner(transformers.Trainer):
    """The Trainer with our optimizer groups (its own optimizer class and settings) and an
    optional penalty added to the training loss."""

    def __init__(
        self, *args, groups: list[dict], penalty: Callable[[], torch.Tensor] | None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.groups, self.penalty = groups, penalty

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = cls(self.groups, **kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.penalty is None or not model.training:
            return out
        return (out[0] + self.penalty(), out[1]) if return_outputs else out + self.penalty()


def check_args(args: argparse.Namespace) -> None:
    """The fine-tuning flags' own ranges, before any data or model is read."""
    if not 0.0 < args.layer_decay <= 1.0:
        raise UserError(
            f"--layer-decay {args.layer_decay} must be in (0, 1]: 1 trains every layer at"
            " --lr, 0.8 lowers each layer below the head by a factor 0.8"
        )
    if args.freeze_layers < 0:
        raise UserError(f"--freeze-layers {args.freeze_layers} must be 0 or more")
    if not args.tie_penalty >= 0:  # NaN too
        raise UserError(f"--tie-penalty {args.tie_penalty} must be 0 or more")
    if args.tie_sets is not None and args.tie_penalty == 0:
        raise UserError("--tie-sets says which layers --tie-penalty ties; pass --tie-penalty W")


def depth_flags(args: argparse.Namespace) -> str | None:
    """The flags in use that need a layout, in words; None when none is."""
    used = [
        flag
        for flag, on in (
            ("--layer-decay", args.layer_decay != 1.0),
            ("--freeze-embeddings", args.freeze_embeddings),
            ("--freeze-layers", args.freeze_layers > 0),
            ("--tie-penalty", args.tie_penalty > 0),
        )
        if on
    ]
    return "/".join(used) or None


def optimization(
    args: argparse.Namespace, model: transformers.PreTrainedModel
) -> tuple[list[dict], Callable[[], torch.Tensor] | None]:
    """Freeze, then the optimizer groups and the tie penalty the flags ask for, each said."""
    needed_by = depth_flags(args)
    if needed_by is None:
        return param_groups(model, None, args.lr, 1.0), None
    where = layout(model, needed_by)
    if args.freeze_embeddings or args.freeze_layers:
        for line in freeze(model, where, args.freeze_embeddings, args.freeze_layers):
            print(line)
    groups = param_groups(model, where, args.lr, args.layer_decay)
    if args.layer_decay != 1.0:
        print("lr: " + ", ".join(f"{g['name']} {g['lr']:.3g}" for g in groups))
    if args.tie_penalty == 0:
        return groups, None
    sets = parse_tie_sets(args.tie_sets, where.num_layers)
    ties, weight = tie_groups(model, where, sets), args.tie_penalty
    tied = "; ".join(
        spans(tuple(i for i, t in enumerate(sets) if t == tie))
        for tie in sorted({t for t in sets if t is not None})
    )
    print(f"tie penalty {weight:g} on {len(ties)} parameters tied across layers {tied}")
    return groups, lambda: weight * tie_penalty(ties)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/finetune.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model folder")
    parser.add_argument("--train", type=Path, required=True, help=".csv or .jsonl file")
    parser.add_argument("--eval", type=Path, required=True, help=".csv or .jsonl file")
    parser.add_argument("--output", type=Path, required=True, help="folder for the result")
    parser.add_argument("--text-field", default="text", help="column holding the text")
    parser.add_argument("--label-field", default="label", help="column holding the label")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--layer-decay",
        type=float,
        default=1.0,
        help="in (0, 1]: depth d trains at lr * decay^(L - d) (a shared set: its highest use)",
    )
    parser.add_argument(
        "--freeze-embeddings", action="store_true", help="do not train the embeddings"
    )
    parser.add_argument(
        "--freeze-layers",
        type=int,
        default=0,
        metavar="N",
        help="freeze the first N layer applications (a shared set: only if all its uses are)",
    )
    parser.add_argument(
        "--tie-penalty",
        type=float,
        default=0.0,
        metavar="W",
        help="W * sum_i ||P_i - mean P||^2 over the layers of each tie set (relaxed exports)",
    )
    parser.add_argument(
        "--tie-sets",
        metavar="LIST",
        help="the tie set of each layer, e.g. 0,0,1,1 (- for none; default: one set)",
    )
    return parser.parse_args(argv)


def load_splits(args: argparse.Namespace) -> tuple[dict[str, tuple[list, list]], dict[str, int]]:
    """(texts, labels) of --train and --eval, and the label ids; all checks before any model."""
    splits = {}
    for flag, path in (("--train", args.train), ("--eval", args.eval)):
        ds, where = read_table(path, flag), f"{flag} {path}"
        texts = column(ds, args.text_field, "--text-field", where)
        splits[flag] = texts, column(ds, args.label_field, "--label-field", where)
    return splits, label_ids(splits["--train"][1], splits["--eval"][1], f"--eval {args.eval}")


def load_model(
    folder: Path, ids: dict[str, int], seed: int
) -> tuple[Tokenizer, transformers.PreTrainedModel]:
    kind = kind_of(folder)
    if kind == "int8":
        raise DataError(f"--model {folder} is an int8 export; fine-tune an HF export instead")
    if kind != "hf":
        raise DataError(
            f"--model {folder} is {KINDS[kind]}, not a Hugging Face model folder; export it"
            f" first: python -m pretrain convert --checkpoint {folder} --format hf --output DIR"
        )
    transformers.set_seed(seed)  # before the model: its classifier head is freshly initialized
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with refusing_pickles(folder):
        model = AutoModelForSequenceClassification.from_pretrained(
            folder,
            num_labels=len(ids),
            id2label={i: name for name, i in ids.items()},
            label2id=ids,
            local_files_only=True,
        )
    return tok, model


def training_args(args: argparse.Namespace, train_rows: int) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(args.output),
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        eval_strategy="epoch",
        save_strategy="no",  # checkpoints of a small fine-tune are not worth the disk
        logging_steps=max(1, train_rows // args.batch_size // 4),  # about 4 lines an epoch
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_args(args)
    splits, ids = load_splits(args)
    tok, model = load_model(args.model, ids, args.seed)
    # Exports may claim no length limit: never feed more positions than the model has.
    max_length = min(args.max_length, getattr(model.config, "max_position_embeddings", 1 << 30))
    train_ds, eval_ds = (encode(tok, splits[f], ids, max_length) for f in ("--train", "--eval"))
    groups, penalty = optimization(args, model)
    trainer = FineTuner(
        groups=groups,
        penalty=penalty,
        model=model,
        args=training_args(args, len(train_ds)),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        data_collator=transformers.DataCollatorWithPadding(tok),
        compute_metrics=accuracy,
    )
    trainer.train()
    n, acc = len(eval_ds), trainer.evaluate()["eval_accuracy"]
    chance = max(Counter(eval_ds["labels"]).values()) / n  # always guessing the majority class
    print(f"eval accuracy: {acc:.3f} ({n} examples, chance {chance:.3f})")
    trainer.save_model(str(args.output))  # the model and, as processing_class, the tokenizer
    results = {"accuracy": acc, "chance": chance, "n": n}
    (args.output / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    main_guard(lambda: main(sys.argv[1:]))
