"""Run many multi-process checks inside one launch.

Each launch pays megatron-core's import cost once per process, so a test module registers all of
its checks and launches ``world_size`` processes a single time. A check is a plain function run
on every rank; it passes when it returns without raising on every rank.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from nemo_loop.utils.distributed import free_port


def _worker(rank, world_size, port, check_names, module_name, out_dir, timeout_s):
    import importlib

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from nemo_loop.utils.distributed import destroy_model_parallel, init_distributed

    init_distributed(timeout_s=timeout_s)
    module = importlib.import_module(module_name)
    results = {name: "not run: an earlier check broke the process group" for name in check_names}
    out_file = os.path.join(out_dir, f"rank{rank}.json")
    for name in check_names:
        try:
            getattr(module, name)()
            results[name] = None
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = traceback.format_exc()
            print(f"[rank {rank}] {name} failed:\n{results[name]}", file=sys.stderr, flush=True)
        finally:
            destroy_model_parallel()
        with open(out_file, "w") as fh:
            json.dump(results, fh)
        try:
            torch.distributed.barrier()
        except Exception:  # noqa: BLE001 - a rank died or hung; stop here, keep the results
            return
    torch.distributed.destroy_process_group()


def run_checks(module_name: str, check_names: list[str], world_size: int,
               timeout_s: int = 120) -> dict[str, str | None]:
    """Returns {check: None if it passed on every rank, else the first rank's traceback}."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_worker, args=(world_size, free_port(), check_names, module_name,
                                              out_dir, timeout_s),
                               nprocs=world_size, join=True, start_method="spawn")
        except ProcessException as crash:
            crash_report = str(crash)
        else:
            crash_report = "no result file"
        per_rank = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.json")
            if os.path.exists(path):
                with open(path) as fh:
                    per_rank.append(json.load(fh))
            else:
                per_rank.append({name: f"rank {rank} crashed: {crash_report}"
                                 for name in check_names})
    merged = {}
    for name in check_names:
        failures = [f"rank {r}:\n{res[name]}" for r, res in enumerate(per_rank) if res[name]]
        merged[name] = "\n".join(failures) if failures else None
    return merged
