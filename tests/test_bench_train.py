"""tools/bench_train.py compares like with like: both models start from the same weights and
score the same batch with the same loss, and every figure it prints is there."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from helpers import REPO

from pretrain import bench_train
from pretrain.config import ConfigError, load_config


def bench(cli, *args: str) -> dict:
    result = cli("tools/bench_train.py", *args, "--threads", "1", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parity
@pytest.mark.parametrize("config", ["tiny-albert", "tiny-llama"])
def test_ours_and_the_reference_train_the_same_model(cli, config):
    r = bench(cli, config, "--steps", "2", "--warmup", "1", "--precision", "fp32")
    ours, ref = r["ours"], r["reference"]
    assert ours["first_loss"] == pytest.approx(ref["first_loss"], abs=1e-5)
    assert r["ratio"] == pytest.approx(ours["tokens_per_s"] / ref["tokens_per_s"])
    for m in (ours, ref):
        assert m["tokens_per_s"] > 0 and m["peak_memory_gib"] > 0
        assert m["tflops"] == pytest.approx(m["tokens_per_s"] * r["flops_per_token"] / 1e12)
        assert m["mfu"] is None  # no datasheet peak for a CPU
        assert (
            0
            < m["mfu_measured"]
            == pytest.approx(m["tflops"] / r["peak_tflops"]["measured_matmul"]["fp32"])
        )


@pytest.mark.parity
def test_both_precisions_in_one_table(cli):
    result = cli(
        "tools/bench_train.py",
        "tiny-albert",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--precision",
        "both",
        "--threads",
        "1",
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.splitlines()[-1])
    assert sorted(r) == ["bf16", "fp32"] and r["bf16"]["precision"] == "bf16"
    lines = result.stdout.splitlines()
    rows = [line.split()[:2] for line in lines if line.split()[:1] == ["ours"]]
    assert [row for row in rows if row[1] != "/"] == [["ours", "fp32"], ["ours", "bf16"]]
    speedup = r["bf16"]["ours"]["tokens_per_s"] / r["fp32"]["ours"]["tokens_per_s"]
    assert f"ours, bf16 / fp32: {speedup:.2f}x" in result.stdout
    assert result.stdout.startswith(f"{r['fp32']['config']}: albert, B 8 x T 64, cpu (")


@pytest.mark.distributed
def test_engine_mode_times_the_real_path(cli, shards_dir):
    r = bench(
        cli,
        "tiny-albert",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--engine",
        "--no-reference",
        f"--data.path={shards_dir}",
        "--engine.zero_stage=2",
    )
    assert "reference" not in r and "ratio" not in r
    e = r["engine"]
    assert e["engine_tokens_per_s"] > 0 and e["bare_tokens_per_s"] > 0
    assert e["overhead"] == pytest.approx(e["bare_tokens_per_s"] / e["engine_tokens_per_s"] - 1)
    # The MFU the trainer logs is the bench's own figure: same FLOPs, same (measured) peak.
    assert e["logged_peak_tflops"] == r["peak_tflops"]["measured_matmul"][r["precision"]] > 0
    assert 0 < e["logged_mfu"] <= 1.0
    assert e["logged_mfu"] == pytest.approx(e["mfu"], rel=1e-9)
    assert r["device"].startswith("cpu (")  # the CPU class: AVX2, AVX512-BF16, AMX, ...


@pytest.mark.e2e
def test_an_unknown_preset_is_one_line(cli):
    result = cli("tools/bench_train.py", "no-such-config")
    assert result.returncode == 2
    assert "presets:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_the_engine_path_of_both_precisions_is_refused_in_one_line(cli):
    result = cli("tools/bench_train.py", "tiny-albert", "--precision", "both", "--engine")
    assert result.returncode == 2
    assert "--engine times one precision per process" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.unit
def test_fit_batch_halves_the_micro_batch_until_it_fits(monkeypatch):
    """--fit-batch finds the largest micro-batch that fits (a GPU's out-of-memory is raised
    here for batches over 4); without it, one line names the fix."""
    tried = []

    def report(cfg, args, device, precision):
        tried.append(cfg.engine.micro_batch_size)
        if cfg.engine.micro_batch_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"batch": cfg.engine.micro_batch_size}

    monkeypatch.setattr(bench_train, "report", report)
    cfg = load_config(REPO / "configs" / "tiny-albert.yaml", ["--engine.micro_batch_size=24"])
    args = argparse.Namespace(fit_batch=True)
    assert bench_train.report_fitting(cfg, args, None, "bf16") == {"batch": 3}
    assert tried == [24, 12, 6, 3]
    cfg.engine.micro_batch_size = 8
    with pytest.raises(ConfigError, match="out of memory at micro-batch 8: lower"):
        bench_train.report_fitting(cfg, argparse.Namespace(fit_batch=False), None, "bf16")


@pytest.mark.parity
def test_the_run_mlm_recipe_bench_trains_both_sides_and_scores_them_alike(cli, shards_dir):
    """tools/bench_hf_recipe.py: our trainer and HF's Trainer (DeepSpeed, run_mlm.py's data
    path) each train on 2 ranks; both trained models are scored on the same held-out
    batches, and every figure of the row is the one its parts give."""
    result = cli(
        "tools/bench_hf_recipe.py",
        "configs/tiny-albert.yaml",
        f"--data.path={shards_dir}",
        *("--steps", "10", "--seeds", "0", "--json"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(result.stdout.splitlines()[-1])
    assert row["seed"] == 0 and row["precision"] == "fp32"
    assert row["ours_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["ours_tokens_per_s"] / row["hf_tokens_per_s"])
    # Untrained, either model scores about a uniform guess over the vocabulary (7.6 here,
    # as with --optim.lr=1e-9); after 10 steps both are about 7.0: the trained weights are
    # what was scored.
    uniform = math.log(2000)
    for key in ("ours_held_out_loss", "hf_held_out_loss"):
        assert 0 < row[key] < uniform - 0.3, row
    assert "ours/HF" in result.stdout
