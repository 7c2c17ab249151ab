"""One run per output folder.

The run's rank 0 holds an exclusive advisory lock (`flock`) on `<train.output_dir>/.run.lock`
for the whole run; the kernel releases it when the process ends, however it ends, so a
crashed run never blocks the next. The file also names its holder (host, pid, SLURM job,
start time) and is refreshed while the run lives: on a shared file system whose advisory
locks do not reach other hosts, a fresh file naming another host still stops a second run,
and a stale one (not refreshed for `stale_s`) is taken over with one warning line.

A SLURM requeue keeps its job id: a start that finds the folder held by its own job (the
predecessor still saving) waits for it, up to `wait_s`, instead of failing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pretrain.errors import UserError

LOCK_FILE = ".run.lock"
REFRESH_S = 30.0
STALE_S = 300.0
WAIT_S = 600.0


class FolderInUseError(UserError):
    """train.output_dir is held by another live run (rank 0 finds it and tells the others)."""

    collective = True


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    job: str | None
    started: str

    @classmethod
    def this_process(cls) -> Holder:
        started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), started)

    def describe(self) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}, started {self.started}"


def _read_holder(handle) -> Holder | None:
    handle.seek(0)
    try:
        return Holder(**json.loads(handle.read()))
    except (ValueError, TypeError):
        return None  # empty, or not ours: nothing to honour


class RunLock:
    """The lock of one output folder; `acquire` before anything in it is touched."""

    def __init__(
        self,
        folder: Path,
        refresh_s: float = REFRESH_S,
        stale_s: float = STALE_S,
        wait_s: float = WAIT_S,
    ) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.refresh_s, self.stale_s, self.wait_s = refresh_s, stale_s, wait_s
        self._handle = None
        self._stop = threading.Event()

    def acquire(self) -> str | None:
        """Hold the folder, or raise FolderInUseError naming the live holder. Returns the warning
        line of a stale lock taken over, if one was."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = Holder.this_process()
        start = time.monotonic()
        while True:
            handle = self.path.open("a+")
            holder = self._try_lock(handle, me)
            if holder is None and self._still_there(handle):
                break
            handle.close()
            if holder is None:
                continue  # locked a file its holder had just removed: take the new one
            waited = time.monotonic() - start
            if holder.pid < 0 and waited < 2.0:
                time.sleep(0.1)  # held, its holder not yet written: it is starting too
                continue
            same_job = me.job is not None and holder.job == me.job
            if not same_job or waited > self.wait_s:
                note = f" (waited {self.wait_s:.0f} s for it)" if same_job else ""
                raise FolderInUseError(
                    f"train.output_dir {self.path.parent} is in use by another run"
                    f" ({holder.describe()}){note}; wait for it to end, or choose another"
                    " train.output_dir"
                )
            time.sleep(1.0)  # our own job's predecessor, still saving: it ends soon
        warning = self._stale_warning(handle, me)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(asdict(me)) + "\n")
        handle.flush()
        self._handle = handle
        threading.Thread(target=self._refresh, name="run-lock", daemon=True).start()
        return warning

    def _still_there(self, handle) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def _try_lock(self, handle, me: Holder) -> Holder | None:
        """None once this process holds the lock, else who does."""
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(handle) or Holder("unknown", -1, None, "unknown")
        holder = _read_holder(handle)
        if holder is None or holder.host == me.host or self._age(handle) > self.stale_s:
            return None  # gone: on this host the kernel lock would still be held
        # Another host's run, refreshed lately: its lock did not reach us (shared FS).
        fcntl.flock(handle, fcntl.LOCK_UN)
        return holder

    def _stale_warning(self, handle, me: Holder) -> str | None:
        holder = _read_holder(handle)
        if holder is None or holder.host == me.host:
            return None
        return (
            f"warning: taking over {self.path}: its holder ({holder.describe()}) has not"
            f" refreshed it for {self._age(handle):.0f} s"
        )

    @staticmethod
    def _age(handle) -> float:
        return time.time() - os.fstat(handle.fileno()).st_mtime

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                os.utime(self.path)
            except OSError:
                return  # the folder went away: nothing left to guard

    def release(self) -> None:
        """End the hold (also what the kernel does when the process dies)."""
        self._stop.set()
        if self._handle is not None:
            self.path.unlink(missing_ok=True)
            self._handle.close()  # closing drops the flock
            self._handle = None
