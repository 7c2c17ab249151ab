import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command-line entry point of the project as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


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
