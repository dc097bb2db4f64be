"""Checkpoint-and-requeue on a pre-timeout or preemption signal.

Slurm sends SIGUSR1 some minutes before the time limit (``#SBATCH --signal=USR1@600``, see
``slurm/``) and SIGTERM when it ends or preempts a job. :class:`PreemptionHandler` turns either
into a flag; the train loop asks :meth:`PreemptionHandler.stop_requested` after every step, which
all ranks answer together (the flag is all-reduced with MAX, so a signal that reached only some
ranks stops all of them at the same step). The loop then saves a checkpoint and raises
:class:`Preempted`, a ``SystemExit`` with :data:`REQUEUE_EXIT_CODE`: the process exits with that
code, and the batch script (``slurm/common.sh``) requeues the job, whose next run resumes from
the checkpoint. The requeue is the batch script's job rather than rank 0's: ``scontrol requeue``
ends the running job at once, so it must come after every rank has finished writing.

SIGUSR1 only sets the flag, however often it arrives. SIGTERM sets it once and restores the
previous SIGTERM handler, so a second SIGTERM terminates the process as before. :meth:`close`
restores all previous handlers. A training run installs its handler before its setup (storage
checks, model, resume), so a signal that arrives then is not fatal either (SIGUSR1's default
action would end the process with -10, which the batch script does not requeue); one handler
is active per process: installing a new one closes the previous one (say, of a run whose
setup failed in the same process) first.
"""

from __future__ import annotations

import os
import signal
import threading

import torch

# Also in slurm/common.sh (REQUEUE_EXIT_CODE).
REQUEUE_EXIT_CODE = 85


class Preempted(SystemExit):
    """Raised after the checkpoint of a preempted run is saved; exits with REQUEUE_EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step = step


class PreemptionHandler:
    _active: PreemptionHandler | None = None

    def __init__(self, signals: tuple = (signal.SIGUSR1, signal.SIGTERM)):
        self.received: int | None = None
        self._previous: dict = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        PreemptionHandler.close_active()
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        PreemptionHandler._active = self

    def _handle(self, signum, frame) -> None:
        first = self.received is None
        self.received = signum
        if first:  # os.write: print() is not safe inside a signal handler
            os.write(2, f"[preemption] got {signal.Signals(signum).name}: saving a checkpoint "
                        f"after this step\n".encode())
        if signum == signal.SIGTERM and signum in self._previous:
            signal.signal(signum, self._previous.pop(signum))

    def stop_requested(self) -> bool:
        """Whether any rank got a signal. Collective: every rank must call it at the same step."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    @classmethod
    def close_active(cls) -> None:
        """Give the signals back from whichever handler this process has installed (a run set
        up in-process and never trained keeps its handler until the process exits)."""
        if cls._active is not None:
            cls._active.close()

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        if PreemptionHandler._active is self:
            PreemptionHandler._active = None
