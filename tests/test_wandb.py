"""Weights & Biases beside TensorBoard and metrics.jsonl: a real offline run of the trainer,
read back from W&B's own run file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import REPO, run_single

from pretrain.config import load_config
from pretrain.model.accounting import account

pytestmark = pytest.mark.e2e


def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file: 32 KiB blocks of chunks (crc32, length,
    kind) after a 7-byte header, each record a protobuf of W&B's own schema."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunks, records = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def wandb_run(folder: Path) -> dict:
    """An offline run's config, history rows and summary, as plain data."""
    (run_file,) = folder.glob("run-*.wandb")
    out: dict = {"config": {}, "history": [], "summary": {}}

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["config"] |= {key(i): json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "config":
            out["config"] |= {key(i): json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"] |= {key(i): json.loads(i.value_json) for i in record.summary.update}
    return out


def test_wandb_offline_records_the_config_parameters_and_every_logged_step(shards_dir, tmp_path):
    out = tmp_path / "run"
    wandb = ["--logging.wandb=true", "--logging.wandb_mode=offline", "--logging.every=1"]
    result = run_single(shards_dir, out, *wandb, "--train.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (out / "wandb").glob("offline-run-*")
    run_id = (out / "wandb-run-id").read_text().strip()
    assert folder.name.endswith(run_id)
    record = wandb_run(folder)
    cfg = record["config"]
    assert cfg["model"]["num_layers"] == 4 and cfg["train"]["max_steps"] == 3
    acc = account(load_config(REPO / "configs" / "tiny-albert.yaml", ["--model.vocab_size=150"]))
    assert cfg["params"]["unique_params"] == acc.unique_params
    assert record["summary"]["effective_params"] == acc.effective_params
    logged = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").open())}
    steps = {row["_step"]: row["train/loss"] for row in record["history"] if "train/loss" in row}
    assert steps == logged

    # A resumed run continues the same W&B run.
    again = run_single(shards_dir, out, *wandb, "--train.max_steps=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "wandb-run-id").read_text().strip() == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
