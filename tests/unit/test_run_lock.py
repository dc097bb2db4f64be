"""The run lock (nemo_loop/utils/run_lock.py) without training: who holds it is recorded and
named, the kernel releases it with its process, and file systems without flock fall back to a
node-local lock."""

import errno
import json
import os
import subprocess
import sys

import pytest

from nemo_loop.utils import run_lock
from nemo_loop.utils.run_lock import RunLockedError, hold_lock, holder_pid

HOLD = ("import sys, time; from nemo_loop.utils.run_lock import hold_lock; "
        "hold_lock(sys.argv[1], 'the thing'); print('held', flush=True); time.sleep(120)")


def _holder(lock) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_held_lock_names_its_holder_and_dies_with_it(tmp_path):
    lock = tmp_path / ".run.lock"
    holder = _holder(lock)
    try:
        record = json.loads(lock.read_text())
        assert record["pid"] == holder.pid and holder_pid(lock) == holder.pid
        assert record["host"] and record["started"] and "-c" in record["command"]
        with pytest.raises(RunLockedError, match=rf"the run dir is in use by another run: PID "
                                                 rf"{holder.pid} on host {record['host']}"):
            hold_lock(lock, "the run dir")
    finally:
        holder.kill()
        holder.wait()
    assert hold_lock(lock, "the run dir") == lock  # the kernel released it: no stale lock
    assert hold_lock(lock, "the run dir") == lock  # this process holds it: a no-op
    assert holder_pid(lock) == os.getpid()


def test_without_flock_support_the_lock_is_node_local(tmp_path, monkeypatch, capsys):
    real_flock = run_lock.fcntl.flock
    shared = tmp_path / "lustre_without_flock"
    shared.mkdir()

    def no_flock_on_the_shared_fs(stream, operation):
        if str(shared) in stream.name:
            raise OSError(errno.ENOSYS, "Function not implemented")
        return real_flock(stream, operation)

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock_on_the_shared_fs)
    locked = hold_lock(shared / ".run.lock", f"output directory {shared}")
    assert locked.parent == run_lock.Path(run_lock.tempfile.gettempdir())
    assert "does not support flock" in capsys.readouterr().err
    monkeypatch.setattr(run_lock.fcntl, "flock", real_flock)
    other = subprocess.run([sys.executable, "-c", HOLD, str(locked)], capture_output=True,
                           text=True, timeout=60)
    assert other.returncode != 0 and f"PID {os.getpid()}" in other.stderr
