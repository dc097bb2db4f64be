"""Process-group and model-parallel setup shared by recipes, tests and benchmarks."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

from nemo_loop.utils import cpu_compat


@dataclass
class ParallelConfig:
    """The model-parallel layout (``parallel:`` in every config); data parallel is what remains
    of the world size."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False

    def data_parallel(self, world_size: int) -> int:
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_parallel × pipeline_parallel "
                f"= {self.tensor_parallel} × {self.pipeline_parallel}"
            )
        return world_size // model_parallel


def init_distributed(timeout_s: int = 300) -> None:
    """Join the torch.distributed world described by the launcher's env (torchrun or Slurm).

    NCCL on GPUs, gloo on CPU. A single process without launcher env becomes a world of one.
    """
    cpu_compat.enable()
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "WORLD_SIZE" not in os.environ:
        # A world of one on a free port, leaving the environment untouched for child processes.
        torch.distributed.init_process_group(backend=backend, timeout=timeout, rank=0,
                                             world_size=1,
                                             init_method=f"tcp://127.0.0.1:{free_port()}")
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The process groups this process's model-parallel state created (see destroy_model_parallel).
_MODEL_PARALLEL_GROUPS: list = []


def initialize_model_parallel(layout: ParallelConfig, seed: int = 1234) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    destroy_model_parallel()
    layout.data_parallel(torch.distributed.get_world_size())
    before = set(_process_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
    )
    _MODEL_PARALLEL_GROUPS.extend(group for group in _process_groups() if group not in before)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    """Drop megatron's model-parallel state *and* destroy the process groups it created.

    megatron-core's ``destroy_model_parallel`` only forgets its groups; each gloo group keeps
    its worker threads and sockets, so a process that re-initialises model parallelism (tests,
    layout changes) would gain some 60 threads per initialisation. Collective when there are
    groups to destroy (every rank calls it, as it calls ``initialize_model_parallel``).
    Idempotent; also cleans up after a caller that used megatron's own
    ``destroy_model_parallel``."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    live = set(_process_groups())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 and \
            any(group in live for group in _MODEL_PARALLEL_GROUPS):
        # A rank that leaves a collective first must not close its sockets while a peer is
        # still reading its side of it.
        torch.distributed.barrier()
    while _MODEL_PARALLEL_GROUPS:
        group = _MODEL_PARALLEL_GROUPS.pop()
        if group in live:
            torch.distributed.destroy_process_group(group)


def _process_groups() -> list:
    """Every live process group but the default one. torch has no public list of them; this is
    the registry ``destroy_process_group`` itself consults."""
    if not torch.distributed.is_initialized():
        return []
    registry = torch.distributed.distributed_c10d._world.pg_map
    return [group for group in registry if group is not torch.distributed.group.WORLD]
