"""Child processes that do not outlive the process that started them.

Linux's ``PR_SET_PDEATHSIG`` asks the kernel to send a signal to a process when its parent
dies, however the parent dies (SIGKILL and out-of-memory kills included, which no handler in
the parent sees). It is set by the child itself and survives ``exec``, so a launcher starts
its children through this module::

    python -m nemo_loop.utils.processes COMMAND [ARGS...]

which sets it (SIGKILL), exits if its parent is no longer the launcher named in
:data:`LAUNCHER_PID_ENV` (it died before the call), and execs COMMAND — rather than through a
``preexec_fn``, which makes ``subprocess`` fork the whole launcher instead of spawning (about
0.1-0.3 s for a parent holding torch). The signal watches the direct parent only, so a
launcher in between (torchrun starts its workers in sessions of their own) is covered by each
worker setting it again: :func:`die_with_launcher`. Elsewhere (macOS) there is no such signal:
the functions return False and the caller's process groups are what is left.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# A launcher that owns its children (the study runner) puts its PID here and starts them
# with launch_command(); a torchrun worker among them calls die_with_launcher() first thing.
LAUNCHER_PID_ENV = "NEMO_LOOP_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def set_parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies."""
    return _LIBC is not None and _LIBC.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def die_with_parent(ancestor_pid: int | None = None) -> None:
    """SIGKILL this process when its parent dies; if ``ancestor_pid`` (the process everything
    here must die with, e.g. a study runner above torchrun) is already gone, exit now."""
    set_parent_death_signal(signal.SIGKILL)
    if ancestor_pid is not None and not is_alive(ancestor_pid):
        os._exit(128 + signal.SIGKILL)


def die_with_launcher() -> None:
    """:func:`die_with_parent` when a launcher set :data:`LAUNCHER_PID_ENV` (nothing
    otherwise): called early by a process such a launcher started, directly or through
    torchrun."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher:
        die_with_parent(int(launcher))


def launch_command(command: list[str]) -> list[str]:
    """``command`` run through this module: it dies with the process that starts it (which
    must set :data:`LAUNCHER_PID_ENV` to its PID in the child's environment)."""
    return [sys.executable, "-m", "nemo_loop.utils.processes", *command]


def main(argv: list[str]) -> None:
    set_parent_death_signal(signal.SIGKILL)
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and os.getppid() != int(launcher):
        os._exit(128 + signal.SIGKILL)  # the launcher died before the signal was set
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
