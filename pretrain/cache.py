"""Where the stack keeps what it measures or builds once per machine: ~/.cache/pretrain (or
$XDG_CACHE_HOME/pretrain). Standard library only."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pretrain"
