"""Route megatron-core's CUDA device requests to the CPU when no GPU is present.

megatron-core 0.19.2 hard-codes ``device="cuda"``, ``torch.cuda.current_device()``,
``torch.cuda.current_stream()``, ``.cuda()`` and ``param.type() == 'torch.cuda.FloatTensor'`` in
its RoPE, p2p communication, pipeline schedules, DDP buffers and distributed optimizer, and its
RNG tracker snapshots the CUDA generator. Everything else in megatron-core is device-agnostic.

``enable()`` patches exactly those entry points. It is a no-op when CUDA is available, so the
GPU path is never touched. It is idempotent and must run before models or optimizers are built.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_ENABLED = False
_CPU = torch.device("cpu")
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
              "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor")


def is_active() -> bool:
    return _ENABLED


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _route_device_kwarg(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for torch.cuda.Stream/current_stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return _NullEvent()


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _patch_rng_tracker():
    """Back megatron's model-parallel RNG tracker with the CPU generator."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    mcore_random.CudaRNGStatesTracker.fork = contextlib.contextmanager(fork)
    mcore_random.CudaRNGStatesTracker.add = add


def _patch_tensor_type_name():
    """megatron-core asserts ``param.type() == 'torch.cuda.FloatTensor'`` (optimizer, grad
    clipping); on CPU the same tensors report 'torch.FloatTensor'."""
    original_type = torch.Tensor.type

    @functools.wraps(original_type)
    def cuda_type_name(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if not args and not kwargs and name.startswith("torch.") and "cuda" not in name:
            return "torch.cuda." + name[len("torch."):]
        return name

    torch.Tensor.type = cuda_type_name


def enable() -> bool:
    """Install the CPU routes if CUDA is unavailable. Returns whether they are active."""
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return _ENABLED
    for name in _FACTORIES:
        setattr(torch, name, _route_device_kwarg(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    original_to = torch.Tensor.to

    @functools.wraps(original_to)
    def to(self, *args, **kwargs):
        if args and _to_cpu_device(args[0]) is _CPU and not isinstance(args[0], torch.Tensor):
            args = (_CPU,) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    _patch_rng_tracker()
    _patch_tensor_type_name()
    _ENABLED = True
    return True
