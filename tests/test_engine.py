"""The DeepSpeed config we build, and the non-finite loss guard of the trainer."""

from __future__ import annotations

import json

import pytest
from helpers import run_ranks, run_single

from pretrain.config import EngineConfig, OptimConfig
from pretrain.engine.ds_config import build_ds_config
from pretrain.engine.runtime import PrecisionError, check_precision


@pytest.mark.unit
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_precision_the_accelerator_lacks_is_one_line_naming_what_runs(precision):
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {
        "fp32": True,
        "bf16": accelerator.is_bf16_supported(),
        "fp16": accelerator.is_fp16_supported(),
    }
    if supported[precision]:
        check_precision(precision)  # no error where it runs
        return
    # fp16 on CPUs: DeepSpeed's own check would end every rank with a traceback
    usable = " or ".join(p for p, ok in supported.items() if ok)
    with pytest.raises(PrecisionError) as err:
        check_precision(precision)
    assert str(err.value) == (
        f"engine.precision={precision} is not supported on this machine's"
        f" {accelerator.device_name()} accelerator; use engine.precision={usable}"
    )
    assert err.value.collective


@pytest.mark.unit
def test_ds_config_states_what_the_run_relies_on():
    ds = build_ds_config(
        EngineConfig(zero_stage=3, micro_batch_size=4, grad_accum_steps=3, precision="bf16"),
        OptimConfig(grad_clip=0.0),
        world_size=2,
    )
    # DeepSpeed 0.19.8 clips at 1.0 unless told: the value is always written out.
    assert ds["gradient_clipping"] == 0.0
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 3)
    assert ds["train_batch_size"] == 24
    assert ds["zero_optimization"] == {
        "stage": 3,
        "overlap_comm": True,
        "stage3_param_persistence_threshold": 100000,
        "stage3_max_reuse_distance": int(1e9),
        "stage3_max_live_parameters": int(1e9),
    }
    # The trainer calls step() once per optimizer step, whatever micro-batches it skipped.
    assert ds["managed_gradient_accumulation"] is False
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False


@pytest.mark.unit
@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        (EngineConfig(zero_stage=2, offload_optimizer=True), {"offload_optimizer"}),
        (EngineConfig(zero_stage=3, offload_params=True), {"offload_param"}),
        (EngineConfig(zero_stage=1), set()),
    ],
)
def test_offload_options(engine, expected):
    zero = build_ds_config(engine, OptimConfig(), 1)["zero_optimization"]
    assert {k for k in zero if k.startswith("offload")} == expected
    for key in expected:
        assert zero[key]["device"] == "cpu"


EXPLODE = ["--optim.lr=1e30", "--optim.grad_clip=0", "--train.max_steps=4", "--checkpoint.every=1"]


@pytest.mark.distributed
def test_nonfinite_loss_is_skipped_and_reported(shards_dir, tmp_path):
    out = tmp_path / "run"
    result = run_single(shards_dir, out, *EXPLODE, "--train.on_nonfinite=skip")
    assert "non-finite loss, micro-batch skipped" in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped_micro_batches"] == 0
    skipped = sum(r["skipped_micro_batches"] > 0 for r in rows[1:])
    assert skipped > 0
    # It ended with those steps skipped: not a success, and the summary says which step
    # its last loss is from.
    assert result.returncode == 2, result.stderr[-2000:]
    last = next(line for line in result.stderr.splitlines() if line.startswith("last loss"))
    assert f"no finite loss after it, to step {rows[-1]['step']}" in last
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"{skipped} of its steps after the last sound" in error[0]


@pytest.mark.distributed
def test_nonfinite_loss_stops_with_the_last_checkpoint_intact(shards_dir, tmp_path):
    out = tmp_path / "run"
    result = run_single(shards_dir, out, *EXPLODE, "--train.on_nonfinite=stop")
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "non-finite loss at step" in error[0], result.stderr[-2000:]
    step = int(error[0].split("at step ")[1].split(";")[0])
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step{step - 1:08d}"
    assert "Traceback" not in result.stderr


@pytest.mark.distributed
def test_the_fused_gradient_norm_is_deepspeeds_and_an_overflow_still_skips():
    """2 ranks, ZeRO 1/2 in fp32 and bf16 (tests/zero_norm.py): the one-collective norm that
    clips equals DeepSpeed's own to 1e-6 at every step, and where it replaces the separate
    inf/NaN scan (bf16) a step with inf and NaN gradients is still skipped, the weights kept."""
    layouts = [f"{stage}:{precision}" for precision in ("fp32", "bf16") for stage in (1, 2)]
    rows = run_ranks("zero_norm.py", *layouts)
    assert [row["layout"] for row in rows] == layouts
    for row in rows:
        bf16 = row["layout"].endswith("bf16")
        assert row["installed"] == {
            "scaled_global_norm": True,
            "check_overflow": bf16,
            "buffered_reduce_fallback": False,  # two ranks reduce
        }, row
        *steps, (ours, theirs) = row["norms"]
        assert len(steps) == 3 and all(t > 0.02 for _, t in steps), row  # the clip acted
        for ours_t, theirs_t in steps:
            assert abs(ours_t - theirs_t) <= 1e-6 * theirs_t, row
        assert ours == theirs == float("inf"), row
        assert row["skipped"] and row["unchanged"], row


@pytest.mark.distributed
@pytest.mark.parametrize("ranks", [1, 2])
def test_our_zero_shortcuts_train_bit_for_bit_as_deepspeeds_own_path(ranks):
    """ZeRO-1/2 (tests/zero_paths.py): the one-pass step, the bucket sized to the gradients,
    no contiguous gradients on a CPU and, on one rank, no reduction of the rank with itself
    give the weights and fp32 masters of DeepSpeed's own path and defaults bit for bit over
    clipped steps and a skipped non-finite one."""
    layouts = ["1:fp32", "2:fp32", "2:bf16"]
    rows = run_ranks("zero_paths.py", *layouts, ranks=ranks)
    assert [row["layout"] for row in rows] == layouts
    expected = [False, False, False, True, False]  # step 4's loss is not finite
    for row in rows:
        assert row["installed"] == {
            "step": True,
            "buffered_reduce_fallback": ranks == 1,
            "contiguous_gradients": False,
        }, row
        assert row["moved"] and row["skipped"] == [expected, expected], row
        assert row["same_weights"] and row["same_master"], row


@pytest.mark.unit
def test_the_gradient_bucket_holds_the_model_and_cpu_gradients_are_not_copied_into_it():
    """DeepSpeed allocates its ZeRO-1/2 bucket afresh at every micro-step: sized to the
    model's gradients (never above DeepSpeed's default), and on a CPU not filled by a copy
    of each gradient (no caching allocator to keep from fragmenting)."""
    for stage in (1, 2):
        engine = EngineConfig(zero_stage=stage)
        zero = build_ds_config(engine, OptimConfig(), 2, gradient_elements=1234, cpu=True)
        assert zero["zero_optimization"]["reduce_bucket_size"] == 1234
        assert zero["zero_optimization"]["contiguous_gradients"] is False
        large = build_ds_config(engine, OptimConfig(), 2, gradient_elements=10**10, cpu=False)
        assert large["zero_optimization"]["reduce_bucket_size"] == int(5e8)
        assert "contiguous_gradients" not in large["zero_optimization"]  # DeepSpeed's default
    offload = EngineConfig(zero_stage=2, offload_optimizer=True)
    zero = build_ds_config(offload, OptimConfig(), 2, gradient_elements=1234, cpu=True)
    assert "contiguous_gradients" not in zero["zero_optimization"]
    stage3 = build_ds_config(EngineConfig(zero_stage=3), OptimConfig(), 2, 1234, cpu=True)
    assert not {"reduce_bucket_size", "contiguous_gradients"} & set(stage3["zero_optimization"])


@pytest.mark.unit
def test_deepspeeds_comms_logger_stays_off_unless_asked():
    """DeepSpeed 0.19.8 turns the logger on whenever its key is in the config, and then times
    and synchronises every collective: the key is written only to turn it on."""
    from deepspeed.comm.config import DeepSpeedCommsConfig

    for asked in (False, True):
        ds = build_ds_config(EngineConfig(comms_logger=asked), OptimConfig(), world_size=2)
        assert DeepSpeedCommsConfig(ds).comms_logger_enabled is asked
