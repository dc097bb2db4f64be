"""Save and resume training state with megatron-core's dist_checkpointing.

A checkpoint holds the sharded model, the (distributed) optimizer, the LR scheduler and the
step, and can be loaded under a different TP/PP layout. Three defects of megatron-core 0.19.2's
DistributedOptimizer without TE/apex (torch Adam keeps a per-parameter ``step``) are worked
around here:
  * ``sharded_state_dict`` asserts that all parameters share one ``step``, which fails on a
    fresh optimizer that has no state yet → the state is materialised with one zero-lr step
    before loading;
  * the per-parameter ``step`` is not restored on load (the reshardable loader even raises a
    KeyError for it) → the loader is told to skip it and it is copied from the param groups;
  * loading writes into leaf tensors that require grad → it runs under ``no_grad``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

LATEST = "latest_checkpointed_step.txt"
# Canonical per-parameter optimizer state: reshardable across TP, PP and DP.
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def _sharded_state(ddp_model, optimizer, extra_modules, for_load: bool):
    model_state = ddp_model.module.sharded_state_dict()
    state = {"model": model_state,
             "optimizer": optimizer.sharded_state_dict(model_state, is_loading=for_load,
                                                       metadata=_OPTIMIZER_FORMAT)}
    for name, module in (extra_modules or {}).items():
        state[name] = module.sharded_state_dict(prefix=f"{name}.")
    return state


def save_checkpoint(root: str | Path, step: int, ddp_model, optimizer, scheduler,
                    extra_modules: dict | None = None, trainer_state: dict | None = None) -> Path:
    """Write ``root/step_N`` atomically: into ``step_N.tmp``, then renamed, then marked latest.

    A crash mid-save leaves the previous checkpoint and the ``latest`` marker untouched.
    ``extra_modules`` (e.g. an EMA teacher) are saved sharded beside the model;
    ``trainer_state`` (JSON) holds the step, data position and anything else to resume.
    """
    root = Path(root)
    final, staging = _step_dir(root, step), _step_dir(root, step).with_suffix(".tmp")
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded_state(ddp_model, optimizer, extra_modules, for_load=False),
                            str(staging))
    _save_rng_states(staging)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (staging / "trainer_state.json").write_text(json.dumps(
            {**(trainer_state or {}), "step": step, "scheduler": scheduler.state_dict()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        marker = root / (LATEST + ".tmp")
        marker.write_text(str(step))
        os.replace(marker, root / LATEST)
    torch.distributed.barrier()
    return final


def _rng_file(directory: Path) -> Path:
    return directory / "rng" / f"rank{torch.distributed.get_rank():05d}.pt"


def _save_rng_states(directory: Path) -> None:
    """Per rank: the CPU generator and megatron's model-parallel tracker (dropout streams)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    path = _rng_file(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}, path)


def _load_rng_states(directory: Path) -> None:
    """Each rank restores the streams saved under its rank, if the checkpoint has them."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    path = _rng_file(directory)
    if not path.is_file():
        return
    states = torch.load(path, weights_only=False)
    torch.set_rng_state(states["cpu"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def latest_step(root: str | Path) -> int | None:
    marker = Path(root) / LATEST
    return int(marker.read_text()) if marker.is_file() else None


def _materialise_optimizer_state(optimizer) -> None:
    """Give a fresh torch-Adam-backed optimizer its per-parameter state via a zero-lr step."""
    for part in _inner_optimizers(optimizer):
        inner = part.optimizer
        if inner.state:
            continue
        saved_lrs = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        for group, lr in zip(inner.param_groups, saved_lrs):
            group["lr"] = lr
            for param in group["params"]:
                param.grad = None


def load_checkpoint(root: str | Path, ddp_model, optimizer, scheduler,
                    step: int | None = None, extra_modules: dict | None = None) -> dict:
    """Restore the state saved at ``step`` (default: latest); returns the trainer state."""
    root = Path(root)
    step = latest_step(root) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {root} (missing {LATEST})")
    path = _step_dir(root, step)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    _materialise_optimizer_state(optimizer)
    with torch.no_grad():
        state = dist_checkpointing.load(
            _sharded_state(ddp_model, optimizer, extra_modules, for_load=True), str(path))
        ddp_model.module.load_state_dict(state["model"])
        for name, module in (extra_modules or {}).items():
            prefix = f"{name}."
            module.load_state_dict({key[len(prefix):]: value
                                    for key, value in state[name].items()})
        with _tolerate_missing_step(optimizer):
            optimizer.load_state_dict(state["optimizer"])
    _restore_per_parameter_steps(optimizer)
    _load_rng_states(path)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    scheduler.load_state_dict(trainer_state["scheduler"])
    return trainer_state


def _inner_optimizers(optimizer):
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield part


@contextlib.contextmanager
def _tolerate_missing_step(optimizer):
    """The reshardable loader copies every tensor-valued state entry, including torch Adam's
    per-parameter ``step``, which it never supplies; a None makes it skip that entry."""
    patched = []
    for part in _inner_optimizers(optimizer):
        original = getattr(part, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def with_step_placeholder(model_param, tensors, original=original):
            tensors.setdefault("step", None)
            return original(model_param, tensors)

        part._set_main_param_and_optimizer_states = with_step_placeholder
        patched.append(part)
    try:
        yield
    finally:
        for part in patched:
            del part._set_main_param_and_optimizer_states


def _restore_per_parameter_steps(optimizer) -> None:
    for part in _inner_optimizers(optimizer):
        inner = part.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                if param in inner.state and "step" in inner.state[param]:
                    inner.state[param]["step"] = torch.as_tensor(float(group["step"]))


# ----- model-only checkpoints (converters, evaluation): no optimizer, any TP/PP on load -----


def save_model_checkpoint(model, path: str | Path) -> Path:
    """Save only the model's sharded state to ``path`` (collective over all ranks)."""
    path = Path(path)
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(path))
    torch.distributed.barrier()
    return path


def load_model_checkpoint(model, path: str | Path) -> None:
    """Load the model part of a dist checkpoint (model-only or training) into ``model``,
    whatever TP/PP layout it was saved under."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    with torch.no_grad():
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
        model.load_state_dict(state["model"])
