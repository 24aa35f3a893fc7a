"""One training per run directory: an exclusive lock held for the life of the run.

Two trainings writing one trainer.out_dir would overwrite each other's checkpoints, so the first takes
`<run>/run.lock` and the second refuses, naming the holder. The lock is a file created with O_EXCL (atomic on
local file systems and on NFSv3+/Lustre/GPFS, so it also works between nodes sharing the run directory) holding
the holder's host, pid and start time.

A lock left by a training that died without releasing it (SIGKILL, a crashed node) is stale. On the same host
that is certain when its pid no longer runs (or runs another program, started later): it is taken over with a
warning. On another host this process cannot tell, so it refuses and says how to remove the lock by hand.

    with RunLock(run_dir):  # rank 0 only (the trainer tells the other ranks whether it got it)
        train(...)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
TAKEOVER_TIMEOUT_S = 60  # a takeover marker older than this was left by a process killed mid-takeover


class RunLockError(RuntimeError):
    """The run directory is held by another training; the message names it and says what to do."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot), so a reused pid is told apart; None where
    /proc is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder_is_stale(holder: dict) -> bool:
    """Whether a lock's holder certainly no longer runs (only knowable on its own host)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _alive(pid):
        return True
    recorded = holder.get("proc_start")
    return recorded is not None and _proc_start(pid) not in (None, recorded)


def describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


class RunLock:
    """Exclusive lock on a run directory: `with RunLock(run_dir): ...`, or acquire() / release()."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.held = False
        self.made_dir = False  # acquire() created the run directory (release() removes it again if left empty)

    # -- the lock file ---------------------------------------------------------------------------------------
    def _info(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()),
            "command": " ".join(sys.argv)[:500],
            "token": self.token,
        }

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._info(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        return True

    def read_holder(self) -> dict | None:
        """The current holder's record (None when there is no lock; {} while it is still being written)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    # -- acquire / release -----------------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockError naming its holder (one process per training: rank 0)."""
        for _ in range(50):
            if not self.run_dir.is_dir():  # (again, if a refused run's release removed it as it stood empty)
                self.made_dir = not self.run_dir.exists()
                self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                created = self._create()
            except FileNotFoundError:
                continue
            if created:
                self.held = True
                return self
            holder = self.read_holder()
            if holder is None:  # released between our attempt and the read
                continue
            if not holder:  # being written this instant, or an empty file left by a crash
                age = time.time() - self._mtime()
                if age < 10:
                    time.sleep(0.1)
                    continue
                holder = {"host": socket.gethostname(), "pid": -1}  # empty for seconds: nobody is writing it
            if holder_is_stale(holder):
                self._take_over(holder)
                continue
            raise RunLockError(self._refusal(holder))
        raise RunLockError(f"could not take the lock {self.path}: it keeps changing (another training starting?)")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return time.time()

    def _take_over(self, stale: dict) -> None:
        """Remove a stale lock, one process at a time: whoever holds the takeover marker re-checks the lock it
        is about to remove, so a fresh lock written meanwhile by another process is never removed."""
        marker = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                if time.time() - marker.stat().st_mtime > TAKEOVER_TIMEOUT_S:
                    marker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.1)
            return
        os.close(fd)
        try:
            now = self.read_holder()
            if now is not None and (now == stale or not now) and holder_is_stale(now or stale):
                log.warning(
                    "taking over the lock %s left by a training that no longer runs (%s)", self.path, describe(stale)
                )
                self.path.unlink(missing_ok=True)
        finally:
            marker.unlink(missing_ok=True)

    def _refusal(self, holder: dict) -> str:
        here = socket.gethostname()
        other = holder.get("host") != here
        how = (
            f"if that training is no longer running (check on {holder.get('host')}: ps -p {holder.get('pid')}), "
            f"delete {self.path}"
            if other
            else f"it is still running here (ps -p {holder.get('pid')})"
        )
        return (
            f"{self.run_dir} is in use by another training ({describe(holder)}; lock file {self.path}). Two "
            "trainings in one trainer.out_dir would overwrite each other's checkpoints: wait for it to finish, "
            f"or give this one another trainer.out_dir; {how}"
        )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self.read_holder()
        if holder and holder.get("token") == self.token:  # never remove a lock someone else took over
            self.path.unlink(missing_ok=True)
        if self.made_dir:  # a run refused before writing anything leaves no empty run directory behind
            try:
                self.run_dir.rmdir()  # only if empty: whatever anyone wrote there since stays
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
