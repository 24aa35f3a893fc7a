"""One training per run directory: the run lock refuses a second holder, takes over a dead one's, and names it."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ftlm.train.rundir import LOCK_FILE, RunLock, RunLockError


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_holder_refused_with_the_holder_named(tmp_path):
    run = tmp_path / "run"
    with RunLock(run) as first:
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid() and holder["started"]
        with pytest.raises(RunLockError) as e:
            RunLock(run).acquire()
        msg = str(e.value)
        assert f"{run} is in use by another training (host {socket.gethostname()}, pid {os.getpid()}" in msg
        assert str(run / LOCK_FILE) in msg and "another trainer.out_dir" in msg
        assert first.held
    assert not (run / LOCK_FILE).exists()  # released on exit
    with RunLock(run):  # and free again
        pass


def test_a_run_directory_the_lock_made_goes_again_only_if_left_empty(tmp_path):
    """A run refused before it wrote anything leaves no empty run directory; one that wrote, or one that was there
    before, stays."""
    refused = tmp_path / "refused"
    with RunLock(refused):
        assert refused.is_dir()
    assert not refused.exists()
    trained = tmp_path / "trained"
    with RunLock(trained):
        (trained / "config.yaml").write_text("x")
    assert (trained / "config.yaml").is_file()
    existing = tmp_path / "existing"
    existing.mkdir()
    with RunLock(existing):
        pass
    assert existing.is_dir()


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    pid = dead_pid()
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "yesterday"}))
    with caplog.at_level(logging.WARNING, logger="ftlm.train.rundir"), RunLock(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock {run / LOCK_FILE} left by a training that no longer runs" in caplog.text
    assert f"pid {pid}" in caplog.text


def test_reused_pid_is_stale_when_it_started_later(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # Our own pid, alive, but recorded with another start time: the pid was reused by another program.
    record = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": "1", "started": "long ago"}
    (run / LOCK_FILE).write_text(json.dumps(record))
    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        pytest.skip("no /proc here")
    with RunLock(run):
        assert json.loads((run / LOCK_FILE).read_text())["proc_start"] != "1"


def test_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    record = {"host": "node-17", "pid": 4242, "started": "2026-01-01 00:00:00 UTC"}
    (run / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(RunLockError) as e:
        RunLock(run).acquire()
    msg = str(e.value)
    assert "host node-17, pid 4242, started 2026-01-01 00:00:00 UTC" in msg
    assert f"check on node-17: ps -p 4242), delete {run / LOCK_FILE}" in msg
    assert json.loads((run / LOCK_FILE).read_text()) == record  # left alone


def test_release_never_removes_a_lock_taken_over_by_another(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run).acquire()
    (run / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "theirs"}))
    lock.release()
    assert json.loads((run / LOCK_FILE).read_text())["token"] == "theirs"


HOLD = """
import sys, time
from ftlm.train.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_between_processes_and_after_sigkill(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockError, match=rf"pid {proc.pid}, started"):
            RunLock(run).acquire()
        proc.send_signal(signal.SIGKILL)  # dies holding it, as a killed training does
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while True:  # the kernel may take a moment to reap it
            try:
                with RunLock(run):
                    break
            except RunLockError:
                assert time.time() < deadline
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
