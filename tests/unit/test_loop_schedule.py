"""The loop-aware pipeline schedule, checked by replaying it as message passing (no torch)."""

from __future__ import annotations

from collections import deque

import pytest

from nemo_loop.models.looplm.loop_schedule import (
    chunk_orders,
    forward_only_order,
    in_flight_limit,
    stage_orders,
)

LAYOUTS = [(1, 1, 4), (1, 3, 4), (2, 1, 4), (2, 2, 4), (2, 5, 4), (2, 8, 2), (3, 7, 3),
           (4, 16, 4), (4, 6, 1)]  # (pipeline stages P, micro-batches M, loops R)


def replay(orders, num_loops):
    """Run every stage's op list with blocking receives from per-(kind, sender, receiver) FIFO
    channels, round-robin; returns the peak number of chunks each stage held. Fails on a
    deadlock or when a stage receives a message meant for another chunk."""
    size = len(orders)
    channels: dict[tuple, deque] = {}
    cursors, held, peak = [0] * size, [0] * size, [0] * size

    def expected_message(stage, op):
        """(channel, payload) this op must receive, or None."""
        if not op.backward:
            if stage == 0 and op.loop == 1:
                return None
            source = (stage - 1) % size
            loop = op.loop - 1 if stage == 0 else op.loop  # the ring: stage P−1 feeds loop r+1
            return ("activation", source, stage), (loop, op.micro_batch)
        if stage == size - 1:
            if op.loop == num_loops:
                return None  # the loss's gradient is local
            return ("gradient", 0, stage), (op.loop + 1, op.micro_batch)
        return ("gradient", stage + 1, stage), (op.loop, op.micro_batch)

    def sent_message(stage, op):
        if not op.backward:
            if stage == size - 1 and op.loop == num_loops:
                return None
            return ("activation", stage, (stage + 1) % size), (op.loop, op.micro_batch)
        if stage == 0 and op.loop == 1:
            return None
        return ("gradient", stage, (stage - 1) % size), (op.loop, op.micro_batch)

    finished_loss = set()
    while any(cursors[s] < len(orders[s]) for s in range(size)):
        progressed = False
        for stage in range(size):
            if cursors[stage] == len(orders[stage]):
                continue
            op = orders[stage][cursors[stage]]
            if op.backward and stage == size - 1 and op.micro_batch not in finished_loss:
                raise AssertionError(f"backward {op} before micro-batch's loss")
            needed = expected_message(stage, op)
            if needed is not None:
                queue = channels.setdefault(needed[0], deque())
                if not queue:
                    continue  # blocked on a receive
                got = queue.popleft()
                assert got == needed[1], f"stage {stage} {op} received {got}, not {needed[1]}"
            produced = sent_message(stage, op)
            if produced is not None:
                channels.setdefault(produced[0], deque()).append(produced[1])
            if not op.backward and stage == size - 1 and op.loop == num_loops:
                finished_loss.add(op.micro_batch)
            held[stage] += -1 if op.backward else 1
            peak[stage] = max(peak[stage], held[stage])
            cursors[stage] += 1
            progressed = True
        assert progressed, f"deadlock at {cursors}"
    assert all(not queue for queue in channels.values()), "unreceived messages"
    return peak


@pytest.mark.parametrize("size,count,loops", LAYOUTS)
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_every_stage_runs_every_chunk_once_without_deadlock(size, count, loops, schedule):
    orders = stage_orders(size, count, loops, in_flight_limit(schedule, size, count, loops))
    forwards, backwards = chunk_orders(count, loops, min(size, count))
    for order in orders:
        # the per-kind orders never depend on the schedule: gradients accumulate identically
        assert [(op.loop, op.micro_batch) for op in order if not op.backward] == forwards
        assert [(op.loop, op.micro_batch) for op in order if op.backward] == backwards
    peak = replay(orders, loops)
    if schedule == "1f1b":
        assert max(peak) <= loops * min(size, count)


def test_1f1b_memory_is_flat_in_micro_batches_and_gpipe_memory_grows():
    def peak(schedule, count):
        return max(replay(stage_orders(2, count, 4, in_flight_limit(schedule, 2, count, 4)), 4))

    assert [peak("1f1b", m) for m in (2, 4, 8, 32)] == [8, 8, 8, 8]
    assert [peak("gpipe", m) for m in (2, 4, 8)] == [8, 16, 32]


def test_micro_batches_go_loop_major_in_groups_of_the_pipeline_size():
    forwards, backwards = chunk_orders(3, 2, 2)
    assert forwards == [(1, 0), (1, 1), (2, 0), (2, 1), (1, 2), (2, 2)]
    assert backwards == [(2, 0), (2, 1), (1, 0), (1, 1), (2, 2), (1, 2)]
    assert [(op.loop, op.micro_batch) for op in forward_only_order(3, 2, 2)] == forwards


def test_bad_schedule_and_too_small_limits_raise():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        in_flight_limit("zb", 2, 4, 4)
    with pytest.raises(ValueError, match="cannot hold the 4 loops × 2 micro-batches"):
        stage_orders(2, 4, 4, 7)
