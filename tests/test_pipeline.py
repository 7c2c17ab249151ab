"""Pipeline parallelism (engine.pipeline_stages): stages balanced by FLOPs, the pipelined
model trains as the data-parallel one does, and the tied all-reduce moves exactly the tied
parameters."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from helpers import losses, run_ranks, tiny_config, train

from pretrain.config import Config, ConfigError, DataConfig, EngineConfig

# all-shared, cycle and unshared plans on 2 stages; llama's causal LM head also reads the
# factorized projection, so its tie covers two embedding tensors.
TWO_STAGES = ["albert:none:1:2", "albert:all:1:2", "albert:cycle:1:2", "llama:cycle:0:2"]
# 4 stages of one layer application each: a set tied across all four, middle stages that
# read no data, the token table tied between the first and the last stage only.
FOUR_STAGES = ["albert:all:1:4", "llama:cycle:0:4"]
LAYOUTS = {2: TWO_STAGES, 4: TWO_STAGES + FOUR_STAGES}


def layer_stages(family: str, stages: int, **model) -> list[int]:
    from pretrain.engine.pipeline import layer_stages, unit_bounds
    from pretrain.model import SharedTransformer

    cfg = Config(
        model=tiny_config(family, sop_head=False, **model),
        data=DataConfig(seq_length=32),
        engine=EngineConfig(pipeline_stages=stages, zero_stage=1),
    )
    return layer_stages(unit_bounds(SharedTransformer(cfg.model), cfg))


@pytest.mark.unit
def test_stages_are_balanced_by_flops_not_by_layer_count():
    """Layer applications cost alike whatever set they run, so a light head splits them
    evenly. A causal LM head over 20k tokens outweighs all eight layers and takes the last
    stage alone; an MLM head over the same vocabulary, run at the masked positions only,
    weighs about five layers and leaves two beside it."""
    assert layer_stages("albert", 2, num_layers=8) == [0] * 4 + [1] * 4
    assert layer_stages("albert", 2, num_layers=8, sharing={"strategy": "all"}) == [0] * 4 + [1] * 4
    assert layer_stages("albert", 2, num_layers=8, vocab_size=20000) == [0] * 6 + [1] * 2
    assert layer_stages("llama", 2, num_layers=8, vocab_size=20000) == [0] * 8
    assert layer_stages("llama", 4, num_layers=8, vocab_size=20000) == [0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("engine", "model", "message"),
    [
        ({"zero_stage": 2}, {}, "needs engine.zero_stage 0 or 1 (got 2)"),
        ({"activation_checkpointing": True}, {}, "engine.activation_checkpointing=false"),
        ({}, {"sop_head": True}, "set model.sop_head=false"),
        ({}, {"sharing": {"strategy": "all", "ratio": 0.5}}, "set model.sharing.ratio=1.0"),
        ({"pipeline_stages": 8}, {}, "must not exceed model.num_layers (4)"),
    ],
)
def test_the_config_refuses_what_the_pipeline_does_not_carry(engine, model, message):
    engine = {"pipeline_stages": 2, "zero_stage": 1, **engine}
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config(
            model=tiny_config("albert", **{"sop_head": False, **model}),
            data=DataConfig(seq_length=32),
            engine=EngineConfig(**engine),
        )


def run_pipe_check(ranks: int) -> list[dict]:
    rows = run_ranks("pipe_check.py", *LAYOUTS[ranks], ranks=ranks)
    assert sorted((r["layout"], r["rank"]) for r in rows) == sorted(
        (layout, rank) for layout in LAYOUTS[ranks] for rank in range(ranks)
    )
    return rows


@pytest.mark.distributed
@pytest.mark.parametrize("ranks", [2, 4])
def test_pipeline_matches_data_parallel_and_all_reduces_the_tied_parameters(ranks):
    """S stages x ranks/S replicas with S micro-batches against ranks data-parallel ranks
    with 1, the same samples in each step: per-step losses within 1e-5 (fp32; measured
    4e-7), for the all-shared, cycle and unshared plans, at ZeRO 0 and 1. On every rank each
    step's tied all-reduce moves the fp32 bytes of the sets its stage shares with another
    stage, plus on the end stages the embedding tensors the head reads. Without the tied
    all-reduce the losses part by 2e-4 after one step."""
    for row in run_pipe_check(ranks):
        stages = int(row["layout"].split(":")[-1])
        assert row["layer_stage"] == sorted(row["layer_stage"])
        assert set(row["layer_stage"]) == set(range(stages)), row["layer_stage"]
        for got, want in zip(row["losses"], row["reference"], strict=True):
            assert abs(got - want) <= 1e-5, row
        assert row["tied_bytes"] == [row["tied_expected"]] * len(row["losses"]), row


PIPELINE = ["--engine.pipeline_stages=2", "--engine.grad_accum_steps=2"]
RUN = ["--engine.zero_stage=1", "--model.sop_head=false", "--checkpoint.every=2"]


@pytest.mark.distributed
def test_trainer_pipeline_run_resumes_and_exports_like_data_parallel(shards_dir, tmp_path):
    """Through launch/pretrain.sh on 2 ranks: 2 stages with 2 micro-batches per step log
    the per-step losses, MLM accuracy, token counts and gradient norm of 2 data-parallel
    ranks with 1; resumed from the step-2 checkpoint, steps 3 and 4 again; the exported
    fp32 weights equal the data-parallel run's."""
    from pretrain.engine.pipeline import layer_state_dict
    from pretrain.export.checkpoint import read_checkpoint

    dp, pp, resumed = tmp_path / "dp", tmp_path / "pp", tmp_path / "resumed"
    train(shards_dir, dp, *RUN, "--train.max_steps=4")
    evaluate = ["--train.eval_every=4", "--train.eval_steps=1"]
    train(shards_dir, pp, *RUN, *PIPELINE, "--train.max_steps=4", *evaluate)
    tag = "step00000002"
    shutil.copytree(pp / "checkpoints" / tag, resumed / "checkpoints" / tag)
    train(shards_dir, resumed, *RUN, *PIPELINE, "--train.max_steps=4")
    for key in ("loss", "mlm_loss", "mlm_acc", "mlm_tokens", "grad_norm"):
        want = losses(dp, key)
        assert sorted(want) == [1, 2, 3, 4]
        for run, steps in ((pp, [1, 2, 3, 4]), (resumed, [3, 4])):
            got = losses(run, key)
            assert sorted(got) == steps, (run.name, key)
            for step in steps:
                assert abs(got[step] - want[step]) <= 1e-5, (run.name, key, step, got, want)
    # The last stage's held-out metrics reach every rank's log.
    assert sorted(losses(pp, "eval_mlm_acc")) == [4]
    weights = {run.name: read_checkpoint(run).state for run in (dp, pp)}
    assert sorted(weights["pp"]) == sorted(weights["dp"])
    for name, tensor in weights["dp"].items():
        assert (weights["pp"][name] - tensor).abs().max() <= 1e-5, name
    # Exported from the optimizer's fp32 masters (ZeRO-1); in fp32 the stages' own layer
    # files (what a ZeRO-0 export reads) hold the same values.
    trained = read_checkpoint(pp)
    held = layer_state_dict(pp / "checkpoints" / "step00000004", trained.cfg)
    assert all(torch.equal(held[name], tensor) for name, tensor in trained.state.items())
