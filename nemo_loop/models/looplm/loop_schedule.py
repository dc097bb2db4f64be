"""The order in which each pipeline stage runs its chunks: a loop-aware 1F1B schedule.

A *chunk* is one (loop, micro-batch) pass through one stage. Seen from a micro-batch, R loops
over P stages are a pipeline of R·P virtual stages (loop r on stage p is virtual stage
(r−1)·P + p), so this is megatron's interleaved 1F1B with the loops as the model chunks, except
that every virtual stage of a physical stage shares its weights, and a micro-batch's backward
can only start once its last loop has run (the loss reads every loop's readout).

Every stage takes its forwards and its backwards in two fixed orders, by groups of G = min(P, M)
micro-batches (megatron's micro-batch group of the interleaved schedule):

    forwards:  for group: for loop 1..R:  for micro-batch in group
    backwards: for group: for loop R..1:  for micro-batch in group

Only the interleaving of the two lists depends on the schedule, never the order within each, so
every schedule accumulates the weight gradients of a stage in the same order and gives
bit-identical gradients. The interleaving comes from simulating all stages (a forward costs 1,
a backward 2): a free stage starts its next forward if the forward's input exists and the stage
holds fewer than ``in_flight_limit`` chunks, else its next backward if that one's gradient
exists, else waits. The limit R·G (``"1f1b"``) is the smallest that lets a group's forwards
reach its first loss, i.e. the warm-up depth: activation memory no longer grows with the number
of micro-batches. No limit (``"gpipe"``) runs every forward before any backward: memory grows
with micro-batches × loops, the pipeline bubble is the same or slightly smaller.

Because each stage's order is a simulated global execution in which every chunk starts only
after the chunks it receives from, the real run (blocking receives, non-blocking sends) cannot
deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

SCHEDULES = ("1f1b", "gpipe")
FORWARD_COST, BACKWARD_COST = 1, 2  # a backward does about twice the work of a forward


@dataclass(frozen=True)
class ChunkOp:
    backward: bool
    loop: int  # 1-based
    micro_batch: int  # 0-based


def chunk_orders(num_micro_batches: int, num_loops: int, group_size: int
                 ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(forwards, backwards) as (loop, micro-batch) lists, the same on every stage."""
    forwards, backwards = [], []
    for start in range(0, num_micro_batches, group_size):
        group = range(start, min(start + group_size, num_micro_batches))
        forwards += [(loop, m) for loop in range(1, num_loops + 1) for m in group]
        backwards += [(loop, m) for loop in range(num_loops, 0, -1) for m in group]
    return forwards, backwards


def in_flight_limit(schedule: str, pipeline_size: int, num_micro_batches: int,
                    num_loops: int) -> int | None:
    """Most chunks a stage holds activations for at once; None = unlimited."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {SCHEDULES}")
    if schedule == "gpipe":
        return None
    return num_loops * min(pipeline_size, num_micro_batches)


def forward_only_order(num_micro_batches: int, num_loops: int, pipeline_size: int
                       ) -> list[ChunkOp]:
    """Without backwards every stage simply walks the forward order."""
    forwards, _ = chunk_orders(num_micro_batches, num_loops,
                               min(pipeline_size, num_micro_batches))
    return [ChunkOp(False, loop, m) for loop, m in forwards]


@lru_cache(maxsize=128)
def stage_orders(pipeline_size: int, num_micro_batches: int, num_loops: int,
                 limit: int | None) -> tuple[tuple[ChunkOp, ...], ...]:
    """Each stage's forwards and backwards, interleaved (see the module docstring)."""
    group_size = min(pipeline_size, num_micro_batches)
    if limit is not None and limit < num_loops * group_size:
        raise ValueError(f"an in-flight limit of {limit} chunks cannot hold the {num_loops} loops "
                         f"× {group_size} micro-batches a group needs before its first loss")
    return _Simulation(pipeline_size, num_micro_batches, num_loops, limit).run()


class _Simulation:
    def __init__(self, pipeline_size, num_micro_batches, num_loops, limit):
        self.size, self.loops, self.limit = pipeline_size, num_loops, limit
        self.forwards, self.backwards = chunk_orders(num_micro_batches, num_loops,
                                                     min(pipeline_size, num_micro_batches))
        self.done_at: dict[tuple[bool, int, int, int], int] = {}  # (backward, stage, loop, m)
        self.orders = [[] for _ in range(pipeline_size)]
        self.next_forward = [0] * pipeline_size
        self.next_backward = [0] * pipeline_size
        self.busy_until = [0] * pipeline_size

    def _finished(self, key, now) -> bool:
        return self.done_at.get(key, now + 1) <= now

    def _forward_ready(self, stage, now) -> bool:
        index = self.next_forward[stage]
        if index == len(self.forwards):
            return False
        held = index - self.next_backward[stage]
        if self.limit is not None and held >= self.limit:
            return False
        loop, m = self.forwards[index]
        if stage > 0:
            return self._finished((False, stage - 1, loop, m), now)
        return loop == 1 or self._finished((False, self.size - 1, loop - 1, m), now)

    def _backward_ready(self, stage, now) -> bool:
        index = self.next_backward[stage]
        if index == len(self.backwards):
            return False
        loop, m = self.backwards[index]
        if stage < self.size - 1:
            return self._finished((True, stage + 1, loop, m), now)
        loss_done = self._finished((False, stage, self.loops, m), now)
        return loss_done and (loop == self.loops or self._finished((True, 0, loop + 1, m), now))

    def _start(self, stage, backward, now) -> None:
        queue, cursor = (self.backwards, self.next_backward) if backward \
            else (self.forwards, self.next_forward)
        loop, m = queue[cursor[stage]]
        cursor[stage] += 1
        self.busy_until[stage] = now + (BACKWARD_COST if backward else FORWARD_COST)
        self.done_at[(backward, stage, loop, m)] = self.busy_until[stage]
        self.orders[stage].append(ChunkOp(backward, loop, m))

    def run(self) -> tuple[tuple[ChunkOp, ...], ...]:
        total = 2 * len(self.forwards)
        now = 0
        while any(len(order) < total for order in self.orders):
            for stage in range(self.size):
                if self.busy_until[stage] > now:
                    continue
                if self._forward_ready(stage, now):
                    self._start(stage, False, now)
                elif self._backward_ready(stage, now):
                    self._start(stage, True, now)
            later = [t for t in self.busy_until if t > now]
            if not later:
                raise RuntimeError("pipeline schedule simulation made no progress (a bug)")
            now = min(later)
        return tuple(tuple(order) for order in self.orders)
