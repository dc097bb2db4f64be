"""Workarounds for megatron-core 0.19.2's DistributedOptimizer checkpoints without TE/apex,
where torch Adam keeps a per-parameter ``step``:

  * ``sharded_state_dict`` asserts that all parameters share one ``step``, which fails on a
    fresh optimizer that has no state yet → :func:`materialise_optimizer_state` gives it state
    with one zero-lr step before loading;
  * the per-parameter ``step`` is not restored on load (the reshardable loader even raises a
    KeyError for it) → :func:`tolerate_missing_adam_step` tells the loader to skip it and
    :func:`restore_per_parameter_steps` copies it from the param groups;
  * loading writes into leaf tensors that require grad → the caller loads under ``no_grad``.
"""

from __future__ import annotations

import contextlib

import torch


def materialise_optimizer_state(optimizer) -> None:
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


def _inner_optimizers(optimizer):
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield part


@contextlib.contextmanager
def tolerate_missing_adam_step(optimizer):
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


def restore_per_parameter_steps(optimizer) -> None:
    for part in _inner_optimizers(optimizer):
        inner = part.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                if param in inner.state and "step" in inner.state[param]:
                    inner.state[param]["step"] = torch.as_tensor(float(group["step"]))
