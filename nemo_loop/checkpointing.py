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
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

LATEST = "latest_checkpointed_step.txt"
# Canonical per-parameter optimizer state: reshardable across TP, PP and DP.
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def _sharded_state(ddp_model, optimizer, step: int, for_load: bool):
    model_state = ddp_model.module.sharded_state_dict()
    return {"model": model_state,
            "optimizer": optimizer.sharded_state_dict(model_state, is_loading=for_load,
                                                      metadata=_OPTIMIZER_FORMAT)}


def save_checkpoint(root: str | Path, step: int, ddp_model, optimizer, scheduler) -> Path:
    root = Path(root)
    path = _step_dir(root, step)
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded_state(ddp_model, optimizer, step, for_load=False), str(path))
    if torch.distributed.get_rank() == 0:
        (path / "trainer_state.json").write_text(json.dumps(
            {"step": step, "scheduler": scheduler.state_dict()}))
        (root / LATEST).write_text(str(step))
    torch.distributed.barrier()
    return path


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
                    step: int | None = None) -> int:
    """Restore the state saved at ``step`` (default: latest); returns that step."""
    root = Path(root)
    step = latest_step(root) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {root} (missing {LATEST})")
    path = _step_dir(root, step)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    _materialise_optimizer_state(optimizer)
    with torch.no_grad():
        state = dist_checkpointing.load(_sharded_state(ddp_model, optimizer, step, for_load=True),
                                        str(path))
        ddp_model.module.load_state_dict(state["model"])
        with _tolerate_missing_step(optimizer):
            optimizer.load_state_dict(state["optimizer"])
    _restore_per_parameter_steps(optimizer)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    scheduler.load_state_dict(trainer_state["scheduler"])
    return trainer_state["step"]


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
