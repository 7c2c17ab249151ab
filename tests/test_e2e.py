"""The whole path through the command-line tools, as a user takes it: token shards
(tools/preprocess.py), 2-rank pretraining of configs/tiny-albert.yaml (launch/pretrain.sh),
export to Hugging Face checked against our logits (tools/convert_checkpoint.py --verify).

The run's per-step losses must equal the golden ones in tests/golden/tiny-albert.json. They
change with anything that changes the numbers: the model, its initialisation, the data
order, the masking, the objective, the optimizer, DeepSpeed's reduction. Where such a change
is meant, write the file again from the new code and commit it with the change:

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_e2e.py --update-golden
"""

from __future__ import annotations

import json
import re
import sys
from importlib.metadata import version

import pytest
from helpers import REPO, env, losses, run_process

from pretrain.config.reference import config_keys

pytestmark = pytest.mark.e2e

GOLDEN = REPO / "tests" / "golden" / "tiny-albert.json"
CONFIG = "configs/tiny-albert.yaml"
# The config as shipped, but for the vocabulary of the test tokenizer (150 pieces), a short
# run and a loss at every step.
OVERRIDES = ["--model.vocab_size=150", "--train.max_steps=10", "--logging.every=1"]
# fp32 on CPU, one thread per rank, fixed seeds: two runs on one machine give the same bits.
# Elsewhere the order of floating-point sums inside kernels may differ: 2 threads per rank,
# or torch's AVX2 or SSE kernels instead of AVX-512 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA),
# moved these losses by at most 4.8e-7, one fp32 ulp at 5.7. A 1 % larger learning rate
# moves them by 1.6e-3 by step 10, another seed by 0.13: 1e-5 is 20 ulps, and far below
# the smallest real change tried.
TOLERANCE = 1e-5
PACKAGES = ("torch", "deepspeed", "sentencepiece", "numpy")


def test_preprocess_train_export_and_golden_losses(
    corpus_dir, tokenizer_dir, tmp_path, cli, update_golden
):
    data, run, hf = tmp_path / "data", tmp_path / "run", tmp_path / "hf"
    args = ["--input", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--held-out", "3"]
    shards = cli("tools/preprocess.py", *args, "--output", str(data))
    assert shards.returncode == 0, shards.stderr[-3000:]

    command = ["bash", str(REPO / "launch" / "pretrain.sh"), str(REPO / CONFIG)]
    paths = [f"--data.path={data}", f"--train.output_dir={run}"]
    trained = run_process([*command, *paths, *OVERRIDES], env=env(), timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]

    exported = cli(
        "tools/convert_checkpoint.py", "--checkpoint", str(run), "--format", "hf", "--output",
        str(hf), "--verify",
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    diff = float(re.search(r"max \|logit diff\| = (\S+)", exported.stdout).group(1))
    assert diff <= 1e-5, exported.stdout

    if update_golden:
        write_golden(losses(run))
    else:
        compare_with_golden(losses(run))


def write_golden(got: dict[int, float]) -> None:
    GOLDEN.parent.mkdir(exist_ok=True)
    record = {
        "about": "per-step training loss of the run in tests/test_e2e.py; written by"
        " `OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_e2e.py --update-golden`",
        "config": CONFIG,
        "overrides": OVERRIDES,
        "ranks": 2,
        "versions": {name: version(name) for name in PACKAGES},
        "loss": {str(step): loss for step, loss in sorted(got.items())},
    }
    GOLDEN.write_text(json.dumps(record, indent=2) + "\n")


def compare_with_golden(got: dict[int, float]) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert golden["config"] == CONFIG and golden["overrides"] == OVERRIDES, (
        "the golden file was written for another run; write it again (see this module)"
    )
    want = {int(step): loss for step, loss in golden["loss"].items()}
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    off = {s: (got[s], want[s]) for s in want if abs(got[s] - want[s]) > TOLERANCE}
    versions = {
        name: (golden["versions"].get(name), version(name))
        for name in PACKAGES
        if golden["versions"].get(name) != version(name)
    }
    assert not off, (
        f"losses off the golden ones by more than {TOLERANCE} (step: (now, golden)): {off};"
        f" package versions (golden, now) that differ: {versions or 'none'}"
    )


@pytest.mark.parametrize(
    "command",
    [
        ["bash", "launch/pretrain.sh", "--help"],
        [sys.executable, "launch/pretrain.sh", "--help"],  # as the deepspeed launcher runs it
        ["bash", "launch/pretrain.sbatch", "--help"],
    ],
    ids=["script", "script-as-python", "sbatch"],
)
def test_launcher_help_shows_usage_and_every_config_key(command):
    result = run_process(command, env=env())
    assert result.returncode == 0, result.stderr[-2000:]
    usage = "launch/pretrain.sbatch CONFIG" if "sbatch" in command[1] else "launch/pretrain.sh"
    assert usage in result.stdout
    for key in config_keys():
        assert f"  {key.name}: {key.type} = " in result.stdout, key.name


LEAVE = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from pretrain.train import leave

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
log = out.joinpath("thread").open("w")

def late_writer():
    time.sleep(0.5)
    log.write("finished")
    log.close()

threading.Thread(target=late_writer).start()
# An executor left running (as torch.compile's are): a normal exit stops its idle workers.
ThreadPoolExecutor(1).submit(time.sleep, 0.1)
print("last line", flush=False)
leave(3)
"""


def test_a_rank_leaves_after_its_threads_exit_handlers_and_output(tmp_path):
    """A finished rank skips the interpreter's teardown, not what a normal exit does: the
    status, threads still writing, idle executors, exit handlers and buffered output all
    survive, and the process ends."""
    result = run_process([sys.executable, "-c", LEAVE, str(tmp_path)], env=env(), timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stdout.endswith("\nlast line\n")  # after the import's log lines
    assert (tmp_path / "thread").read_text() == "finished"
    assert (tmp_path / "atexit").read_text() == "ran"
