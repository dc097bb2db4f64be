"""In-process model parallelism cleans up after itself: re-initialising it (every algorithm's
setup, every in-process parity fixture) destroys the previous layout's process groups, so a test
session does not pile up gloo groups and their threads (a full run once held ~3,000)."""

import gc

import torch


def _live_groups() -> list:
    """Every process group but the default one (torch's registry; it has no public list)."""
    return [group for group in torch.distributed.distributed_c10d._world.pg_map
            if group is not torch.distributed.group.WORLD]


def _os_threads() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def test_reinitialising_model_parallelism_keeps_threads_and_groups_bounded(
        megatron_single_process):
    from nemo_loop.utils.distributed import (
        ParallelConfig,
        destroy_model_parallel,
        initialize_model_parallel,
    )

    initialize_model_parallel(ParallelConfig())
    gc.collect()
    threads, groups = _os_threads(), len(_live_groups())
    assert groups > 0  # megatron's groups of one layout
    for _ in range(5):
        initialize_model_parallel(ParallelConfig())
    gc.collect()
    # each initialisation used to leave ~20 gloo groups and ~60 threads behind
    assert len(_live_groups()) == groups
    assert _os_threads() <= threads + 2, (threads, _os_threads())

    destroy_model_parallel()
    gc.collect()
    assert _live_groups() == [] and torch.distributed.is_initialized()
    assert _os_threads() < threads
    initialize_model_parallel(ParallelConfig(), seed=1234)  # as the session fixture left it
