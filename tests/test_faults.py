"""Fault injection: every file a run reads is verified before it is trusted.

Run alone with `pytest -m faults`. One short 2-rank run is shared; each test breaks a copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    env,
    launch_args,
    losses,
    run_cli,
    run_process,
    train,
    trainer_args,
    wait_for_step,
)
from safetensors.torch import load_file

from pretrain.config import Config, OptimConfig
from pretrain.config.schema import DistillConfig, ObjectiveConfig
from pretrain.data.preprocess import METADATA
from pretrain.data.shards import TokenShards
from pretrain.data.tokenizer import Tokenizer
from pretrain.engine import manifest
from pretrain.engine.manifest import MANIFEST, manifest_problem, write_manifest
from pretrain.engine.optim import lr_factor
from pretrain.engine.resume import loss_changes

pytestmark = pytest.mark.faults

STEP2, STEP4 = "step00000002", "step00000004"


@pytest.fixture(scope="module")
def run4(shards_dir, tmp_path_factory) -> Path:
    """4 steps, ZeRO-2, a checkpoint every 2 steps: step00000002 and step00000004."""
    out = tmp_path_factory.mktemp("run4")
    train(shards_dir, out, "--train.max_steps=4", "--checkpoint.every=2", "--engine.zero_stage=2")
    return out


@pytest.fixture
def run(run4, tmp_path) -> Path:
    """A copy of the shared run to break."""
    copy = tmp_path / "run"
    shutil.copytree(run4, copy)
    return copy


def broken_copy(ckpt: Path, source: str, tag: str) -> Path:
    """A copy of checkpoint `source` named `tag`, cut short as a killed save leaves it: one
    optimizer file half-written."""
    shutil.copytree(ckpt / source, ckpt / tag)
    optim = next((ckpt / tag).glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    return ckpt / tag


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.distributed
def test_a_save_lists_every_file_and_each_fault_is_named(run):
    tag_dir = run / "checkpoints" / STEP4
    listed = set(json.loads((tag_dir / MANIFEST).read_text())["files"])
    assert listed == {p.name for p in tag_dir.iterdir()} - {MANIFEST}
    assert manifest_problem(tag_dir) is None
    optim = next(tag_dir.glob("*optim_states.pt"))
    flip_byte(optim)
    assert manifest_problem(tag_dir, hashes=False) is None  # same size: only the hash tells
    assert manifest_problem(tag_dir) == f"{optim.name} does not match its SHA-256"
    optim.write_bytes(optim.read_bytes()[:100])
    assert "is 100 bytes, its manifest says" in manifest_problem(tag_dir)
    (tag_dir / "extra.pt").write_bytes(b"x")
    optim.unlink()
    assert manifest_problem(tag_dir) == f"missing {optim.name}"
    shutil.copy(tag_dir / "extra.pt", optim)
    assert "files its manifest does not list: extra.pt" in manifest_problem(tag_dir)
    (tag_dir / MANIFEST).unlink()
    assert manifest_problem(tag_dir) == "no manifest.json (a save that did not finish)"


@pytest.mark.distributed
def test_pruning_keeps_valid_checkpoints_over_broken_ones(run):
    ckpt = run / "checkpoints"
    broken_copy(ckpt, STEP2, "step00000003")  # broken, older than the newest valid
    broken_copy(ckpt, STEP4, "step00000009")  # broken, newer than every valid one
    manifest.prune(ckpt, keep_last=1)
    assert manifest.step_tags(ckpt) == [STEP4, "step00000009"]
    # Only broken tags left beside one valid: the valid one stays whatever keep_last says.
    shutil.rmtree(ckpt / STEP4)
    manifest.prune(ckpt, keep_last=1)
    assert manifest.step_tags(ckpt) == ["step00000009"]


@pytest.mark.distributed
def test_resume_skips_a_broken_newer_save_and_pruning_removes_it(run, shards_dir):
    ckpt = run / "checkpoints"
    broken_copy(ckpt, STEP4, "step00000005")
    result = train(
        shards_dir,
        run,
        "--train.max_steps=6",
        "--checkpoint.every=2",
        "--checkpoint.keep_last=1",
        "--engine.zero_stage=2",
    )
    warnings = [line for line in result.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(warnings) == 1 and "step00000005" in warnings[0] and "bytes" in warnings[0]
    assert f"resumed from {ckpt / STEP4} at step 4" in result.stderr
    # step 6 saved and verified; the valid step 4 and the broken step 5 are both gone.
    assert manifest.step_tags(ckpt) == ["step00000006"]
    assert manifest_problem(ckpt / "step00000006") is None


@pytest.mark.distributed
def test_export_skips_a_broken_save_and_refuses_it_by_name(run, tmp_path, cli):
    ckpt = run / "checkpoints"
    broken_copy(ckpt, STEP4, "step00000006")
    out = tmp_path / "native"
    args = ("tools/convert_checkpoint.py", "--checkpoint", str(run), "--format", "native")
    ok = cli(*args, "--output", str(out))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "warning: skipping checkpoint" in ok.stderr and "step00000006" in ok.stderr
    bad = cli(*args, "--tag", "step00000006", "--output", str(tmp_path / "other"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"checkpoint {ckpt / 'step00000006'} does not verify" in bad.stderr
    assert not (tmp_path / "other").exists()


class Plant:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "pattern", ["mp_rank_00_model_states.pt", "*_optim_states.pt", "rng_rank*.pt"]
)
def test_a_planted_pickle_never_runs_on_resume(run, shards_dir, tmp_path, pattern):
    """A file of each kind the resume path reads, replaced by a pickle that runs code, with
    the manifest rewritten to match (whoever can write the folder can): the run refuses it
    in one line, and the code never runs."""
    tag_dir = run / "checkpoints" / STEP4
    marker = tmp_path / "pwned"
    for path in tag_dir.glob(pattern):
        torch.save({"state": Plant(marker)}, path)
    write_manifest(tag_dir)
    result = run_process(
        launch_args(
            "tiny-albert.yaml",
            shards_dir,
            run,
            "--train.max_steps=5",
            "--checkpoint.every=2",
            "--engine.zero_stage=2",
        ),
        env=env(),
        timeout=300,
    )
    assert result.returncode != 0
    assert not marker.exists()
    assert "refusing to load" in result.stderr and "it names posix.system" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def resume(run: Path, shards_dir: Path, *overrides: str):
    """The shared run's config, continued in `run` with `overrides`; any exit status."""
    args = launch_args(
        "tiny-albert.yaml", shards_dir, run, "--checkpoint.every=2", "--engine.zero_stage=2"
    )
    return run_process([*args, *overrides], env=env(), timeout=300)


def one_error(result) -> str:
    """The job's single error line (rank 0 speaks for a failure every rank shares)."""
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def planted_hf(run4, tmp_path_factory) -> tuple[Path, Path]:
    """An HF export of the shared run whose weights became a pytorch_model.bin that runs a
    command when unpickled, and the marker file that command would leave."""
    out = tmp_path_factory.mktemp("planted")
    folder, marker = out / "hf", out / "pwned"
    export = ("--checkpoint", str(run4), "--format", "hf", "--output", str(folder))
    assert run_cli("tools/convert_checkpoint.py", *export).returncode == 0
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": Plant(marker)}, folder / "pytorch_model.bin")
    return folder, marker


READERS = {
    "import": ["tools/convert_checkpoint.py", "--from-hf", "{hf}", "--format", "native"],
    "reshare": [
        *("tools/convert_checkpoint.py", "--from-hf", "{hf}", "--format", "native"),
        *("--reshare", "strategy=all"),
    ],
    "report": ["-m", "pretrain.report", "{hf}", "--data", "{shards}"],
    "finetune": ["tools/finetune.py", "--model", "{hf}", "--train", "{csv}", "--eval", "{csv}"],
    "teacher": [*trainer_args(Path("{shards}"), Path("{out}"), "--distill.teacher={hf}")],
}


@pytest.mark.e2e
@pytest.mark.parametrize("reader", list(READERS))
def test_a_pickle_planted_in_a_users_hf_folder_is_one_line_for_every_reader(
    reader, planted_hf, shards_dir, tmp_path
):
    """Every way a user's Hugging Face folder is read refuses weights that are more than
    tensors in one line naming the file and the fix; the planted command never runs."""
    hf, marker = planted_hf
    csv = tmp_path / "task.csv"
    csv.write_text("text,label\nthe king,a\nthe queen,b\n")
    fill = {"hf": hf, "shards": shards_dir, "csv": csv, "out": tmp_path / "run"}
    args = [arg.format(**fill) for arg in READERS[reader]]
    if reader in ("import", "reshare", "finetune"):
        args += ["--output", str(tmp_path / "out")]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: refusing to load {hf / 'pytorch_model.bin'}: it holds objects other than"
        " tensors and plain data (it names posix.system); convert it to safetensors"
        " (model.safetensors) from a copy you trust, or use a folder that has one"
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed
def test_requests_that_cannot_be_honoured_are_errors(run, shards_dir):
    line = one_error(resume(run, shards_dir, "--train.max_steps=3"))
    assert "it is at step 4, past train.max_steps (3)" in line
    # A decaying schedule was planned for 4 steps: going on to 8 needs to be asked for.
    line = one_error(resume(run, shards_dir, "--train.max_steps=8", "--optim.decay=linear"))
    assert "with optim.decay='linear'" in line and "--train.replan_schedule=true" in line
    # The checkpoint would carry its own LR on: a new one must be asked for.
    line = one_error(resume(run, shards_dir, "--train.max_steps=8", "--optim.lr=0.001"))
    assert "planned with optim.lr=0.003" in line
    assert manifest.step_tags(run / "checkpoints") == [STEP2, STEP4]  # nothing touched


@pytest.mark.distributed
def test_resuming_under_another_loss_is_refused_unless_asked(run, shards_dir):
    line = one_error(resume(run, shards_dir, "--train.max_steps=5", "--objective.mask_prob=0.3"))
    assert (
        f"cannot resume from {run / 'checkpoints' / STEP4} with objective.mask_prob=0.3: it was"
        " trained with objective.mask_prob=0.15" in line
    )
    assert "--train.allow_loss_change=true" in line
    assert manifest.newest_valid(run / "checkpoints")[0] == STEP4  # nothing written
    asked = ("--objective.mask_prob=0.3", "--train.allow_loss_change=true")
    result = resume(run, shards_dir, "--train.max_steps=5", *asked)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming with a changed loss: objective.mask_prob 0.15 -> 0.3" in result.stderr


@pytest.mark.unit
def test_every_setting_of_the_loss_counts_as_a_change_and_a_missing_key_as_its_default():
    cfg = Config()
    saved = {"config": cfg.to_dict()}
    assert loss_changes(saved, cfg) == []
    other = Config(distill=DistillConfig(teacher="runs/teacher", alpha=0.5))
    assert loss_changes(saved, other) == [
        ("distill.teacher", "", "runs/teacher"),
        ("distill.alpha", 1.0, 0.5),
    ]
    # A checkpoint of a version without objective.max_ngram trained with its default.
    del saved["config"]["objective"]["max_ngram"]
    assert loss_changes(saved, cfg) == []
    changed = Config(objective=ObjectiveConfig(max_ngram=1))
    assert loss_changes(saved, changed) == [("objective.max_ngram", 3, 1)]


@pytest.mark.distributed
def test_an_extended_schedule_is_replanned_from_the_step_reached(run, shards_dir):
    decay = ["--optim.decay=linear", "--optim.min_lr_ratio=0.1", "--optim.warmup_steps=0"]
    result = resume(run, shards_dir, "--train.max_steps=8", "--train.replan_schedule=true", *decay)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = OptimConfig(lr=0.003, warmup_steps=0, decay="linear", min_lr_ratio=0.1)
    assert f"lr {0.003 * lr_factor(4, cfg, 8):.3g} at step 4" in result.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in rows if r["step"] > 4 and "lr" in r}
    # The LR logged after update k is the one the next update uses: the new schedule's.
    assert logged == {k: pytest.approx(0.003 * lr_factor(k, cfg, 8)) for k in range(5, 9)}


@pytest.mark.distributed
def test_a_diverged_run_stops_and_keeps_the_last_sound_checkpoint(run, shards_dir):
    """lr 1e30 from step 4 on: every later loss is non-finite, so no step is taken; after
    3 such steps the run ends in one line, having saved nothing of the diverged state."""
    result = resume(
        run,
        shards_dir,
        "--train.max_steps=40",
        "--train.max_skipped_steps=3",
        "--optim.lr=1e30",
        "--optim.grad_clip=0",
        "--train.replan_schedule=true",
    )
    line = one_error(result)
    assert "all had non-finite losses: the run diverged" in line
    assert f"last checkpoint: {run / 'checkpoints' / STEP4}" in line
    assert manifest.newest_valid(run / "checkpoints")[0] == STEP4


@pytest.mark.distributed
def test_a_run_that_ends_diverged_fails_and_never_saves_a_non_finite_state(run, shards_dir):
    """lr 1e39 from step 4 on: step 5's loss is finite but its update leaves the weights
    inf, so its checkpoint is refused; steps 6 and 7 are skipped, and the run, ended by
    max_steps before the skip limit, fails in one line naming the last sound state."""
    result = resume(
        run,
        shards_dir,
        "--train.max_steps=7",
        "--checkpoint.every=1",
        "--optim.lr=1e39",
        "--optim.grad_clip=0",
        "--train.replan_schedule=true",
    )
    line = one_error(result)
    assert "step 5: the weights are not finite: not saving" in result.stderr
    sound = run / "checkpoints" / STEP4
    assert (
        "the run diverged: its weights became non-finite and 2 of its steps after the last"
        f" sound checkpoint were skipped as non-finite; the last sound checkpoint is {sound}"
    ) in line
    assert manifest.newest_valid(run / "checkpoints")[0] == STEP4
    assert (run / "checkpoints" / "latest").read_text().strip() == STEP4
    last = next(row for row in result.stderr.splitlines() if row.startswith("last loss"))
    assert last.endswith("(step 5; no finite loss after it, to step 7)")


# -- corpora -------------------------------------------------------------------------------

VERSE = "Now is the winter of our discontent\nMade glorious summer by this sun of York.\n" * 20


def preprocess(cli, corpus: Path, tokenizer_dir: Path, out: Path):
    args = ("--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--output", str(out))
    return cli("tools/preprocess.py", *args)


@pytest.mark.e2e
def test_bytes_that_are_not_text_never_train_a_tokenizer(tmp_path, tokenizer_dir, cli):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "noise.txt").write_bytes(random.Random(0).randbytes(20_000))
    (corpus / "noise.jsonl").write_text(json.dumps({"text": "\x00\x01\x02" * 50}) + "\n")
    (corpus / "verse.txt").write_text(VERSE)
    tok = cli(
        "tokenizer/train.py",
        "--input",
        str(corpus),
        "--vocab-size",
        "60",
        "--output",
        str(tmp_path / "tok"),
    )
    assert tok.returncode == 2 and "Traceback" not in tok.stderr
    assert "most of the input is not text: 2 documents" in tok.stderr
    assert "against 1 of text" in tok.stderr
    assert not (tmp_path / "tok").exists()
    shards = preprocess(cli, corpus, tokenizer_dir, tmp_path / "shards")
    assert shards.returncode == 2 and "most of the input is not text" in shards.stderr
    assert not (tmp_path / "shards").exists()


@pytest.mark.e2e
def test_utf16_and_utf32_files_are_decoded_and_counted(tmp_path, tokenizer_dir, cli):
    """The same verse as UTF-8, UTF-16 (with and without a byte-order mark) and UTF-32:
    four documents of identical tokens, not one of text and three of <unk>."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, encoding in [("a", "utf-8"), ("b", "utf-16"), ("c", "utf-16-le"), ("d", "utf-32")]:
        (corpus / f"{name}.txt").write_bytes(VERSE.encode(encoding))
    out = tmp_path / "shards"
    result = preprocess(cli, corpus, tokenizer_dir, out)
    assert result.returncode == 0, result.stderr
    read = json.loads((out / METADATA).read_text())["read"]
    assert read["decoded"] == {"utf-16": 2, "utf-32": 1} and read["skipped"] == {}
    shards = TokenShards(out, "train")
    docs = [shards.document_tokens(i).tolist() for i in range(shards.num_documents)]
    assert len(docs) == 4 and all(doc == docs[0] for doc in docs)
    first_line = Tokenizer(tokenizer_dir).encode([VERSE.split("\n")[0]])[0]
    assert docs[0][: len(first_line)] == first_line  # the text itself, not <unk>


# -- the launcher ----------------------------------------------------------------------------


def rank_processes(out: Path) -> list:
    import psutil

    def is_rank(p) -> bool:
        try:
            command = " ".join(p.cmdline())
        except psutil.Error:
            return False
        return "--local_rank=" in command and f"--train.output_dir={out}" in command

    return [p for p in psutil.process_iter() if is_rank(p)]


@pytest.mark.distributed
def test_sigterm_to_the_launcher_returns_after_the_ranks_saved_and_resumes(
    shards_dir, tmp_path, spawn
):
    """A container stop or a scheduler signals the launcher, not the ranks: it passes the
    signal on and returns only when every rank has saved and exited, with their status."""
    out = tmp_path / "run"
    process = spawn(
        # One loader worker per rank, as on a GPU: the signal reaches the workers too.
        launch_args(
            "tiny-albert.yaml", shards_dir, out, "--train.max_steps=100000", "--data.num_workers=1"
        ),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(out, 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert rank_processes(out) == []  # none still running, saving or not
    assert "signal received: saving a checkpoint" in stderr
    tag, skipped = manifest.newest_valid(out / "checkpoints")
    assert tag is not None and skipped == []
    saved = int(tag.removeprefix("step"))
    assert saved >= 3
    resumed = train(shards_dir, out, f"--train.max_steps={saved + 2}")
    assert f"at step {saved}" in resumed.stderr
    assert max(losses(out)) == saved + 2


@pytest.mark.e2e
@pytest.mark.parametrize("ranks", ["0", "two", "-1"])
def test_a_number_of_ranks_that_is_not_a_count_is_one_line(ranks, shards_dir, tmp_path):
    result = run_process(
        launch_args("tiny-albert.yaml", shards_dir, tmp_path / "a", "--train.max_steps=2"),
        env={**env(), "NUM_GPUS": ranks},
        timeout=120,
    )
    assert result.returncode == 2 and not (tmp_path / "a").exists()
    assert result.stderr.strip() == (
        f"error: NUM_GPUS must be a positive number of processes, not '{ranks}'"
    )


@pytest.mark.distributed
def test_a_busy_port_is_one_line_and_the_default_port_is_free(shards_dir, tmp_path):
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        busy = run_process(
            launch_args("tiny-albert.yaml", shards_dir, tmp_path / "a", "--train.max_steps=2"),
            env={**env(), "MASTER_PORT": str(port)},
            timeout=120,
        )
        assert busy.returncode == 2 and not (tmp_path / "a").exists()
        assert busy.stderr.strip() == (
            f"error: MASTER_PORT {port} is in use on this machine (another job?); choose"
            " another, or leave MASTER_PORT unset to pick a free one"
        )
    # Without MASTER_PORT the launcher picks a free port: another job on DeepSpeed's
    # default port (29500) does not stop it.
    with socket.socket() as default:
        with contextlib.suppress(OSError):  # already taken: busy all the same
            default.bind(("", 29500))
            default.listen()
        no_port = {k: v for k, v in env().items() if k != "MASTER_PORT"}
        result = run_process(
            launch_args("tiny-albert.yaml", shards_dir, tmp_path / "b", "--train.max_steps=2"),
            env=no_port,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]


# -- failing ranks and checks before they start ------------------------------------------------


@pytest.mark.distributed
def test_what_a_run_reads_and_writes_is_checked_before_any_rank_starts(shards_dir, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    args = launch_args("tiny-albert.yaml", shards_dir, tmp_path / "file", "--train.max_steps=2")
    line = one_error(run_process(args, env=env(), timeout=120))
    assert line == f"error: train.output_dir {tmp_path / 'file'} is a file; choose a directory"
    data = tmp_path / "data"
    shutil.copytree(shards_dir, data)
    next(data.glob("train-*.sentences.npy")).write_bytes(b"\x93NUMPY garbage")
    args = launch_args("tiny-albert.yaml", data, tmp_path / "run", "--train.max_steps=2")
    result = run_process(args, env=env(), timeout=120)
    assert "is unreadable" in one_error(result) and "preprocess again" in result.stderr
    assert "launch.py" not in result.stderr  # no rank was started


@pytest.mark.distributed
def test_one_failing_rank_ends_the_job_fast_and_says_why_once(run, shards_dir):
    """Rank 1 alone cannot read its file: the job ends within seconds of the error (an
    orderly exit used to wait ~40 s on gloo), with that rank's line and its status."""
    tag_dir = run / "checkpoints" / STEP4
    (tag_dir / "rng_rank1.pt").write_bytes(b"not a torch file")
    write_manifest(tag_dir)
    start = time.monotonic()
    result = resume(run, shards_dir, "--train.max_steps=6")
    elapsed = time.monotonic() - start
    line = one_error(result)
    assert "cannot read" in line and "rng_rank1.pt" in line
    assert "another rank ended" in result.stderr  # rank 0, in one line
    assert elapsed < 30, elapsed  # startup included; was over 40 s
