"""Filesystem guards for run outputs: writability probes, free space, durable renames, and
errors that name their cause.

Nothing here knows about torch: callers decide which rank runs what.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path


class StorageError(OSError):
    """A run's output location cannot take what the run will write; the message says why."""


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def existing_ancestor(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing parent (what statvfs can be asked about)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


MOUNTINFO = Path("/proc/self/mountinfo")


def mount_points(mountinfo: str) -> list[Path]:
    """The mount points listed in a ``/proc/<pid>/mountinfo`` text (field 5; octal escapes such
    as ``\\040`` for a space decoded)."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.append(Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                                      fields[4])))
    return points


def mount_point(path: str | os.PathLike, mountinfo: str | None = None) -> Path:
    """The mount point holding ``path``: the longest mount point of ``/proc/self/mountinfo``
    above it. A bind mount of a directory of the same file system is its own mount point
    there, while ``os.path.ismount`` (a device-number comparison) misses it; without
    ``/proc`` (not Linux) that comparison is the fallback."""
    path = Path(path).absolute()
    existing = existing_ancestor(path)
    path = existing.resolve() / path.relative_to(existing)  # symlinks resolved where they exist
    if mountinfo is None and MOUNTINFO.is_file():
        mountinfo = MOUNTINFO.read_text()
    if mountinfo is not None:
        above = [point for point in mount_points(mountinfo)
                 if point == path or point in path.parents]
        if above:
            return max(above, key=lambda point: len(point.parts))
    path = existing.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def describe_os_error(error: OSError, path: str | os.PathLike | None = None) -> str:
    """The cause in words a user acts on: a full disk names its mount point and free space."""
    where = Path(path if path is not None else error.filename or ".")
    if error.errno == errno.ENOSPC:
        return (f"no space left on {mount_point(where)} ({human_bytes(free_bytes(where))} "
                f"free)")
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded on {mount_point(where)}"
    if error.errno == errno.EROFS:
        return f"{mount_point(where)} is a read-only file system (holding {where})"
    reason = os.strerror(error.errno) if error.errno else str(error)
    return f"{reason.lower()} ({error.filename or where})"


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` and prove it takes a file: write, fsync and remove a probe."""
    path = Path(path)
    probe = path / f".write_probe.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as stream:
            stream.write(b"probe")
            stream.flush()
            os.fsync(stream.fileno())
        probe.unlink()
    except OSError as error:
        raise StorageError(error.errno, f"cannot write to {path}: "
                                        f"{describe_os_error(error, path)}") from error
    return path


def check_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    free = free_bytes(path)
    if free < needed:
        raise StorageError(errno.ENOSPC, f"{mount_point(path)} (holding {path}) has "
                                         f"{human_bytes(free)} free ({free} bytes), but {what} "
                                         f"take about {human_bytes(needed)} ({needed} bytes)")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to the device."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: str | os.PathLike) -> None:
    """Every file under ``root``, then every directory bottom-up, so the tree survives a crash."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)


def write_durably(path: str | os.PathLike, text: str) -> None:
    """Replace ``path``'s content atomically: a synced temporary file renamed over it."""
    path = Path(path)
    staging = path.with_name(path.name + ".tmp")
    with open(staging, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    replace_durably(staging, path)


def replace_durably(source: str | os.PathLike, target: str | os.PathLike) -> None:
    os.replace(source, target)
    fsync_path(Path(target).parent)
