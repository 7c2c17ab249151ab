"""Fine-tune a Hugging Face model (e.g. an ALBERT export) as a text classifier.

    python tools/finetune.py --model HF_DIR --train train.csv --eval eval.jsonl --output DIR
        [--text-field text] [--label-field label] [--epochs 3] [--lr 5e-5]
        [--batch-size 16] [--max-length 128] [--seed 0]

--train/--eval are .csv or .jsonl files; labels (ints or strings) get ids in sorted order.
DIR receives the fine-tuned model, its tokenizer and eval_results.json. Afterwards:

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
import sys
from collections import Counter
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
from pretrain.errors import main_guard

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
    if not (folder / "config.json").is_file():
        raise DataError(f"--model {folder} is not a Hugging Face model folder (no config.json)")
    transformers.set_seed(seed)  # before the model: its classifier head is freshly initialized
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
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
    splits, ids = load_splits(args)
    tok, model = load_model(args.model, ids, args.seed)
    # Exports may claim no length limit: never feed more positions than the model has.
    max_length = min(args.max_length, getattr(model.config, "max_position_embeddings", 1 << 30))
    train_ds, eval_ds = (encode(tok, splits[f], ids, max_length) for f in ("--train", "--eval"))
    trainer = transformers.Trainer(
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
