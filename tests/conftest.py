import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests build everything they use; nothing may reach the Hub, here or in the processes they start.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def run_process(
    command: list[str], *, env: dict | None = None, cwd: Path = REPO, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`subprocess.run` for commands that start process trees (launchers and their ranks).

    The command gets its own session; on timeout the whole group is killed and the test
    fails with the output so far. Plain `subprocess.run` kills only the direct child and then
    waits forever on pipes its grandchildren still hold open.
    """
    process = subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"{' '.join(command[:3])} ... timed out after {timeout}s\n"
            f"{stdout[-2000:]}\n{stderr[-3000:]}"
        ) from None
    finally:
        kill_group(process)  # ranks a launcher left behind
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL every process of the session `process` leads, if any is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def spawn():
    """Popen in a session of its own, the whole group killed at teardown whatever happened."""
    started = []

    def start(command: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(command, start_new_session=True, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        kill_group(process)
        process.wait(timeout=30)


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command-line entry point of the project as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return run_process([sys.executable, *args], env=env, cwd=cwd)


@pytest.fixture
def cli():
    return run_cli


WORDS = [
    "the",
    "king",
    "queen",
    "lord",
    "lady",
    "sword",
    "crown",
    "night",
    "day",
    "love",
    "death",
    "war",
    "peace",
    "heart",
    "blood",
    "honour",
    "friend",
    "enemy",
    "castle",
    "field",
    "river",
    "storm",
    "sea",
    "ship",
    "letter",
    "ring",
    "gold",
    "silver",
    "fool",
    "speak",
    "come",
    "go",
    "stay",
    "fight",
    "fly",
    "weep",
    "laugh",
    "sleep",
    "wake",
    "send",
    "bring",
    "hold",
    "keep",
    "give",
    "take",
    "fair",
    "foul",
    "noble",
    "base",
    "bold",
    "proud",
    "sweet",
    "bitter",
    "young",
    "old",
    "true",
    "false",
    "dark",
    "bright",
]


def make_document(rng, sentences: int) -> str:
    lines = []
    for _ in range(sentences):
        words = rng.choice(WORDS, size=int(rng.integers(4, 14)))
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A small corpus: 24 plain-text documents of 20-60 sentences."""
    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        (root / f"doc{i:02d}.txt").write_text(make_document(rng, int(rng.integers(20, 60))))
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_dir, tmp_path_factory):
    from pretrain.data.sources import ReadReport, iter_documents
    from pretrain.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter_documents([corpus_dir], "text", ReadReport()), out, vocab_size=150)
    return out


@pytest.fixture(scope="session")
def shards_dir(corpus_dir, tokenizer_dir, tmp_path_factory):
    from pretrain.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("shards") / "data"
    preprocess([str(corpus_dir)], tokenizer_dir, out, held_out=3)
    return out
