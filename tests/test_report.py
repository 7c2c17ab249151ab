"""The four figures of a model (pretrain.report): size, held-out quality beside the unigram
baseline, training compute and inference speed, from every kind of model folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BASE, REPO, run_cli, run_single, tiny_config, tiny_model

from pretrain.config import Config, load_config
from pretrain.data.baseline import held_out_baseline, token_counts, unigram_baseline
from pretrain.data.loader import PretrainDataset, make_loader
from pretrain.data.tokenizer import MODEL_FILE
from pretrain.errors import UserError
from pretrain.export import native
from pretrain.export.native import save_native
from pretrain.model import SharedTransformer
from pretrain.report import (
    COLUMNS,
    compute,
    count_nonzero,
    load_for_report,
    main,
    markdown,
    measure,
    report,
)

VOCAB = 150  # the session tokenizer's pieces
BATCHES, BATCH = 2, 8
FAST = {"eval_batches": BATCHES, "batch_size": BATCH, "timing_s": 0.01}


def data_config(shards: Path, **overrides) -> Config:
    return load_config(None, {"data.path": str(shards), "data.seq_length": 32, **overrides})


def export(folder: Path, tokenizer_dir: Path, family: str = "albert", **model) -> Path:
    """A tiny model of the session tokenizer's vocabulary, saved as a native export."""
    m = tiny_model(family, vocab_size=VOCAB, **model)
    save_native(m.state_dict(), m.cfg, tokenizer_dir, folder)
    return folder


@pytest.fixture(scope="module")
def shared(tokenizer_dir, tmp_path_factory) -> Path:
    """An all-shared albert model, exported."""
    return export(tmp_path_factory.mktemp("shared"), tokenizer_dir, sharing={"strategy": "all"})


@pytest.fixture(scope="module")
def shared_row(shared, shards_dir) -> dict:
    return measure(load_for_report(shared), data_config(shards_dir), **FAST)


def hand_eval(model: torch.nn.Module, cfg: Config, key: str) -> tuple[float, float, int]:
    """Loss and accuracy over every target of the first held-out batches, from the full
    logits of a plain forward and a log-softmax written out here: nothing of the objectives'
    code, so that a report averaging per batch (or scoring other positions) fails."""
    labels_key = "mlm_labels" if key == "mlm" else "labels"
    loader = make_loader(PretrainDataset(cfg, "valid"), 0, BATCH)
    nll, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for _, batch in zip(range(BATCHES), loader, strict=False):
            out = model(
                batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                token_type_ids=batch.get("token_type_ids"),
            )
            logits_BTV = out.logits.double()
            labels_BT = batch[labels_key]
            keep_BT = labels_BT != -100
            logits_NV, targets_N = logits_BTV[keep_BT], labels_BT[keep_BT]
            log_z_N = logits_NV.exp().sum(-1).log()
            nll += float((log_z_N - logits_NV.gather(1, targets_N[:, None])[:, 0]).sum())
            correct += int((logits_NV.argmax(-1) == targets_N).sum())
            n += int(keep_BT.sum())
    return nll / n, correct / n, n


# -- size -------------------------------------------------------------------------------------


@pytest.mark.unit
def test_effective_counts_every_application_of_a_shared_layer(shared, shared_row, shards_dir):
    model = load_for_report(shared).model
    assert shared_row["unique_params"] == sum(p.numel() for p in model.parameters())
    assert shared_row["plan"] == "all scope=block"
    # Four applications of one block: the block counts four times in effective.
    block = sum(p.numel() for p in model.encoder.parameters())
    assert shared_row["effective_params"] == shared_row["unique_params"] + 3 * block
    cfg = data_config(shards_dir)
    cfg.model = tiny_config(vocab_size=VOCAB)  # strategy none: nothing to count twice
    unshared = compute(cfg)
    assert unshared["unique_params"] == unshared["effective_params"]
    # Sharing saves parameters, not compute: every application runs its block.
    assert unshared["train_flops_per_token"] == shared_row["train_flops_per_token"]
    # Inference computes token logits at every position, training MLM only at the masked.
    assert unshared["infer_flops_per_token"] > unshared["train_flops_per_token"] / 3
    cfg.model = tiny_config("llama", vocab_size=VOCAB)
    causal = compute(cfg)
    assert causal["train_flops_per_token"] == 3 * causal["infer_flops_per_token"]


@pytest.mark.unit
def test_disk_bytes_are_the_weight_file_and_nonzero_drops_when_pruned(
    shared, tokenizer_dir, tmp_path
):
    loaded = load_for_report(shared)
    assert loaded.disk_bytes == (shared / native.WEIGHTS).stat().st_size
    assert loaded.name == shared.name and loaded.run_cfg is None
    state = loaded.model.state_dict()
    weight = "encoder.ffn.0.fn.up.weight"
    assert weight in state, sorted(state)
    before = loaded.nonzero_params
    state[weight] = torch.zeros_like(state[weight])
    save_native(state, loaded.model_cfg, tokenizer_dir, tmp_path / "pruned")
    pruned = load_for_report(tmp_path / "pruned")
    assert pruned.nonzero_params == before - state[weight].numel()


@pytest.mark.unit
def test_int8_export_counts_its_integer_weights(shared, tokenizer_dir, shards_dir, tmp_path):
    from pretrain.export.compressed import INT8, SCALE, int8_state, quantize_int8, save_int8

    model = load_for_report(shared).model
    with torch.no_grad():
        model.encoder.ffn[0].fn.up.weight[:2] = 0.0  # pruned rows: a scale of their own
    fp32_nonzero = count_nonzero(model)
    quantize_int8(model)
    save_int8(model, model.cfg, tokenizer_dir, tmp_path / "int8")
    loaded = load_for_report(tmp_path / "int8")
    assert loaded.kind == "int8" and loaded.model_cfg == model.cfg
    assert loaded.disk_bytes == (tmp_path / "int8" / native.WEIGHTS).stat().st_size
    stored = int8_state(loaded.model)
    assert any(k.endswith(INT8) for k in stored)
    expected = sum(int(torch.count_nonzero(v)) for k, v in stored.items() if SCALE not in k)
    assert loaded.nonzero_params == expected
    # Weights below half a quantization step become 0.
    assert loaded.nonzero_params < fp32_nonzero
    row = measure(loaded, data_config(shards_dir), **FAST)
    assert row["kind"] == "int8" and 0 < row["eval_loss"] < 2 * row["baseline_loss"]
    assert row["nonzero_params"] == expected < row["unique_params"]


# -- quality ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_masked_token_loss_and_baseline_are_those_of_the_held_out_targets(
    shared, shared_row, shards_dir
):
    cfg = data_config(shards_dir)
    cfg.model = load_for_report(shared).model_cfg
    loss, acc, n = hand_eval(load_for_report(shared).model, cfg, "mlm")
    assert shared_row["objective"] == "mlm" and shared_row["eval_targets"] == n > 0
    assert shared_row["eval_loss"] == pytest.approx(loss, abs=1e-6)
    assert shared_row["eval_acc"] == pytest.approx(acc, abs=1e-6)
    base = held_out_baseline(cfg, BATCHES * BATCH)
    assert base.targets == n
    assert shared_row["baseline_loss"] == pytest.approx(base.loss, abs=1e-9)
    assert shared_row["baseline_acc"] == pytest.approx(base.accuracy, abs=1e-9)
    # An untrained model knows less than token frequencies.
    assert shared_row["eval_loss"] > shared_row["baseline_loss"]


@pytest.mark.unit
def test_causal_model_scores_the_next_token(tokenizer_dir, shards_dir, tmp_path):
    folder = export(tmp_path / "llama", tokenizer_dir, "llama")
    cfg = data_config(shards_dir)
    row = measure(load_for_report(folder), cfg, **FAST)
    cfg.model = load_for_report(folder).model_cfg
    loss, acc, n = hand_eval(load_for_report(folder).model, cfg, "clm")
    assert row["objective"] == "clm" and row["eval_targets"] == n == BATCHES * BATCH * 32
    assert row["eval_loss"] == pytest.approx(loss, abs=1e-6)
    assert row["eval_acc"] == pytest.approx(acc, abs=1e-6)
    valid = PretrainDataset(cfg, "valid")
    targets = np.concatenate([valid[p]["labels"] for p in range(BATCHES * BATCH)])
    base = unigram_baseline(token_counts(PretrainDataset(cfg, "train").shards, VOCAB), targets)
    assert row["baseline_loss"] == pytest.approx(base.loss, abs=1e-9)


@pytest.mark.unit
def test_hf_folder_reports_as_the_weights_it_holds(
    shared, shared_row, tokenizer_dir, shards_dir, tmp_path
):
    from pretrain.export.hf import save_hf

    model = load_for_report(shared).model
    save_hf(model.state_dict(), model.cfg, tokenizer_dir, tmp_path / "hf")
    row = measure(load_for_report(tmp_path / "hf"), data_config(shards_dir), **FAST)
    assert row["kind"] == "hf" and row["family"] == "albert"
    assert row["eval_loss"] == pytest.approx(shared_row["eval_loss"], abs=1e-5)
    assert row["unique_params"] == shared_row["unique_params"]


@pytest.mark.unit
def test_a_model_of_another_tokenizer_is_refused(shared, shards_dir, tmp_path):
    import shutil

    shutil.copytree(shared, tmp_path / "other")
    with (tmp_path / "other" / native.TOKENIZER / MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="another tokenizer"):
        measure(load_for_report(tmp_path / "other"), data_config(shards_dir), **FAST)


# -- speed and the table ----------------------------------------------------------------------


@pytest.mark.unit
def test_speed_and_table(shared_row):
    assert shared_row["latency_ms"] > 0 and shared_row["throughput_tokens_per_s"] > 0
    assert shared_row["threads"] == torch.get_num_threads()
    table = markdown([shared_row, {**shared_row, "name": "second"}]).splitlines()
    assert len(table) == 2 + 2 + 2  # header, rule, two rows, blank line, note
    assert table[0].count("|") == len(COLUMNS) + 1
    assert table[3].startswith("| second |")


@pytest.mark.unit
def test_an_export_without_data_is_one_error_naming_the_fix(shared):
    with pytest.raises(UserError, match="pass --data PATH"):
        report([str(shared)])


@pytest.mark.unit
def test_overrides_without_an_evaluation_config_are_refused(shared):
    with pytest.raises(UserError, match="with --config CONFIG or --data PATH"):
        main([str(shared), "--objective.mask_prob=0.3"])


@pytest.mark.unit
def test_a_folder_that_holds_no_model_is_refused(tmp_path):
    with pytest.raises(UserError, match="holds no model; expected a run directory"):
        load_for_report(tmp_path)


# -- the command line -------------------------------------------------------------------------


@pytest.mark.e2e
def test_cli_prints_json_for_each_model(shared, shards_dir, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("data:\n  seq_length: 24\nobjective:\n  max_predictions: 4\n")
    command = ["-m", "pretrain.report", str(shared), str(shared), f"--config={config}"]
    result = run_cli(*command, f"--data={shards_dir}", "--eval-batches=1", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == [shared.name] * 2
    assert rows[0]["eval_loss"] == rows[1]["eval_loss"]
    assert {"unique_params", "disk_bytes", "train_flops_per_token", "latency_ms"} <= set(rows[0])
    assert rows[0]["seq_length"] == 24
    cfg = data_config(shards_dir, **{"data.seq_length": 24, "objective.max_predictions": 4})
    assert rows[0]["eval_targets"] == held_out_baseline(cfg, 32).targets


@pytest.mark.e2e
def test_cli_a_path_that_is_no_model_is_one_error_line(tmp_path):
    result = run_cli("-m", "pretrain.report", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_a_run_directory_reports_on_its_own_config(shards_dir, tmp_path):
    out = tmp_path / "run"
    trained = run_single(shards_dir, out, "--train.max_steps=2", "--engine.zero_stage=0")
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = run_cli("-m", "pretrain.report", str(out), "--eval-batches=1", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(result.stdout)
    assert row["kind"] == "run" and row["seq_length"] == 48  # the run's, not the default
    assert row["plan"] == "all scope=block" and row["unique_params"] < row["effective_params"]
    run_cfg = load_config(
        REPO / "configs" / "tiny-albert.yaml", [f"--data.path={shards_dir}", *BASE]
    )
    assert row["eval_targets"] == held_out_baseline(run_cfg, 32).targets
    assert row["baseline_loss"] == pytest.approx(held_out_baseline(run_cfg, 32).loss, abs=1e-9)
    # A native export of the run's model takes exactly the bytes reported (the file's size
    # depends on the names and shapes of the weights alone).
    save_native(
        SharedTransformer(run_cfg.model).state_dict(), run_cfg.model, None, tmp_path / "native"
    )
    assert row["disk_bytes"] == (tmp_path / "native" / native.WEIGHTS).stat().st_size
