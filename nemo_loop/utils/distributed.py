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


def initialize_model_parallel(layout: ParallelConfig, seed: int = 1234) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    layout.data_parallel(torch.distributed.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
