"""Peak tensor memory of a block of code, at the allocator, on CUDA and on CPU alike.

``PeakTensorMemory`` measures the largest total of tensor bytes alive at once while the block
runs, counting every tensor allocated inside it — what a device must hold, the figure a memory
plan predicts. On CUDA it is the caching allocator's ``max_memory_allocated`` after a reset. On
CPU there is no allocator statistic, and process RSS is blurred by malloc's arenas, so the block
runs under torch's profiler with ``profile_memory``: every CPU allocation and free is recorded
with the allocator's running total, whose maximum is the peak (tensors that existed before the
block are not counted, nor are their frees). The profiler slows the block down; measure steps,
not long runs.
"""

from __future__ import annotations

import torch


class PeakTensorMemory:
    """``with PeakTensorMemory(device) as peak: ...`` then ``peak.bytes``."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
            else torch.device("cpu"))
        self.bytes = 0
        self._profiler = None
        self._start = 0

    def __enter__(self) -> PeakTensorMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._profiler.__exit__(*exc)
        self.bytes = _peak_total_allocated(self._profiler)
        self._profiler = None


def _peak_total_allocated(profiler) -> int:
    """Largest running total of CPU allocations, relative to the total before the block (the
    reporter's counter also holds tensors an earlier profiled block left alive)."""
    from torch._C._profiler import _EventType

    allocations, pending = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            allocations.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
        pending.extend(event.children)
    if not allocations:
        return 0
    allocations.sort()
    _, first_size, first_total = allocations[0]
    return max(total for _, _, total in allocations) - (first_total - first_size)
