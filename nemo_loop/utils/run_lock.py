"""One process per run directory: an exclusive ``flock`` held until the process ends.

Two runs writing into one directory (a double ``sbatch``, a requeued job racing a manual
restart, a study rerun beside an orphaned unit) delete each other's staging folders and
interleave their metrics. :func:`hold_lock` takes an exclusive, non-blocking ``flock`` on a lock
file and keeps it for the rest of the process; the file records who holds it (host, PID, start
time, command), so a second run refuses at once naming the first. Nothing ever removes a lock:
the kernel releases it when the holding process dies, however it dies (SIGKILL included), so a
killed run never leaves a stale lock behind and no timeout has to guess whether its owner lives.

Shared file systems (docs/cluster.md): NFS v4 carries ``flock`` to the server as a whole-file
lock, so it works across nodes; Lustre does with the ``flock`` mount option (``localflock``
only sees the node's own processes; without either, ``flock`` fails with ENOSYS). Where the
file system refuses ``flock``, the lock falls back to a node-local lock file in the temporary
directory (same directory → same file) and says so: a second run on the same node is still
refused, one on another node is not.

Nothing here knows about torch: the caller decides which rank holds the lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from nemo_loop.utils.storage import StorageError

LOCK_FILE = ".run.lock"
# flock errors that mean "this file system does not do flock", not "someone holds it".
_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}
# Lock files this process holds, by resolved path: open for the life of the process.
_held: dict[str, object] = {}


class RunLockedError(StorageError):
    """Another live process holds the lock; the message names it."""


def hold_lock(lock_file: str | os.PathLike, what: str) -> Path:
    """Take the exclusive lock on ``lock_file`` (created if needed) for the rest of this
    process, and record this process in it. ``what`` names the thing locked in the refusal
    ("output directory /runs/a"). Taking a lock this process already holds is a no-op.
    Returns the lock file actually locked (the node-local fallback where the file system has
    no ``flock``). Raises :class:`RunLockedError` naming the holder."""
    lock_file = Path(lock_file).absolute()
    key = str(lock_file.resolve())
    if key in _held:
        return lock_file
    stream = open(lock_file, "a+")
    try:
        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe_holder(lock_file)
        stream.close()
        raise RunLockedError(errno.EBUSY, f"{what} is in use by another run: {holder} (lock "
                                          f"{lock_file}). Two runs writing into one directory "
                                          f"destroy each other's checkpoints and metrics: wait "
                                          f"for it to end, stop it, or choose another "
                                          f"directory") from None
    except OSError as error:
        stream.close()
        if error.errno not in _UNSUPPORTED:
            raise
        return _hold_node_local(lock_file, key, what, error)
    _record_holder(stream)
    _held[key] = stream
    return lock_file


def _hold_node_local(lock_file: Path, key: str, what: str, error: OSError) -> Path:
    local = Path(tempfile.gettempdir()) / (
        "nemo_loop-" + hashlib.sha256(key.encode()).hexdigest()[:16] + ".lock")
    print(f"warning: {lock_file.parent} does not support flock ({os.strerror(error.errno)}); "
          f"locking {what} on this node only ({local}): a run on another node is not "
          f"detected (docs/cluster.md, 'Checkpoints on a cluster')", file=sys.stderr,
          flush=True)
    locked = hold_lock(local, what)
    _held[key] = _held[str(local.resolve())]
    return locked


def _record_holder(stream) -> None:
    stream.seek(0)
    stream.truncate()
    stream.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "command": " ".join(sys.argv)}) + "\n")
    stream.flush()
    os.fsync(stream.fileno())


def _describe_holder(lock_file: Path) -> str:
    try:
        holder = json.loads(lock_file.read_text())
        return (f"PID {holder['pid']} on host {holder['host']}, started {holder['started']} "
                f"({holder['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        # The holder took the lock but has not written itself yet (or wrote something else).
        return "a process that has not recorded itself yet"


def holder_pid(lock_file: str | os.PathLike) -> int | None:
    """The PID recorded in ``lock_file`` (whether or not that process still holds it)."""
    try:
        return int(json.loads(Path(lock_file).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
