"""Process checks shared by the kill/cleanup tests."""

import time

import psutil


def alive(pids: list[int]) -> list[int]:
    """The processes of ``pids`` that still run (zombies count as gone)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def survivors(pids: list[int], grace_s: float) -> list[int]:
    """The processes of ``pids`` still running after up to ``grace_s`` seconds of waiting."""
    deadline = time.monotonic() + grace_s
    while (running := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return running
