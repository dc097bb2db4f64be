"""Loop-aware pipeline schedule: every micro-batch passes through the shared layers R̃ times.

Layout: pipeline stage p holds layers [p·L/P, (p+1)·L/P) of the L shared layers; stage 0 also
holds the embedding, stage P−1 the final norm, head and exit gate. A *chunk* is one
(loop, micro-batch) pass through one stage. The last stage sends a loop's output back to the
first stage as the next loop's input (the pipeline ring wraps P−1 → 0), so a micro-batch visits
stage p exactly R̃ times.

Order: a loop-aware 1F1B schedule (:mod:`nemo_loop.models.looplm.loop_schedule`). Micro-batches
go in groups of P, loop-major within a group, so while stage 0 starts loop r+1 of the group's
first micro-batch the later stages are still on loop r of the others; once a stage holds the
R̃·P chunks of a group (the warm-up depth) it alternates backwards of that group with forwards
of the next. Activation memory is bounded by R̃·min(P, M) chunks per stage, whatever the number
of micro-batches M (megatron-core's own schedules assume one pass per micro-batch per stage, and
its interleaved schedule cannot carry per-loop readouts to the loss). ``schedule="gpipe"`` lifts
the bound (every forward before any backward): the same chunks in the same per-stage orders,
hence bit-identical losses and gradients; it exists for the memory benchmark and as the test
reference, and no run has a reason to choose it.

Gradients across loops: a last-stage loop output y_r is both the readout of loop r (used by
the loss) and the input of loop r+1 (on stage 0). The loss sees a detached copy of y_r, so the
backward of the loss yields ∂L/∂readout_r without touching the layers; the chunk's own backward
later runs once with ∂L/∂readout_r + ∂L/∂input_{r+1} (received from stage 0).

Communication: receives block, sends do not. Activations travel over the pipeline group and
gradients over the world group: at P = 2 both kinds flow between the same two ranks in both
directions, and separate communicators keep their message orders apart (megatron-core's p2p
uses the world group the same way at P = 2). A send is waited for (its buffer released) once a
message is received that the receiver can only have sent after receiving it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from nemo_loop.models.looplm.loop_schedule import (
    ChunkOp,
    forward_only_order,
    in_flight_limit,
    stage_orders,
)
from nemo_loop.models.looplm.model import (
    LoopGPTModel,
    LoopOutput,
    check_logit_loops,
    check_num_loops,
)

LossFunc = Callable[[dict, LoopOutput], tuple[torch.Tensor, dict]]
ACTIVATION, GRADIENT = "activation", "gradient"


@dataclass
class _Chunk:
    input: torch.Tensor | None  # detached leaf received from the previous stage / loop
    output: torch.Tensor
    readout: torch.Tensor | None = None  # last stage: the detached copy the loss reads


@dataclass
class _MicroBatchState:
    rotary: torch.Tensor | None = None
    readouts: list[torch.Tensor] = field(default_factory=list)


class _Channel:
    """Stage-to-stage hand-off over the pipeline ring, or local queues when PP = 1."""

    def __init__(self, config, pipeline_size: int):
        self.dtype = config.pipeline_dtype
        self._local = {ACTIVATION: deque(), GRADIENT: deque()} if pipeline_size == 1 else None
        self._pending: dict[object, list] = {}  # release key → in-flight sends
        if self._local is None:
            group = parallel_state.get_pipeline_model_parallel_group()
            rank, size = torch.distributed.get_rank(group), pipeline_size
            self._next = torch.distributed.get_global_rank(group, (rank + 1) % size)
            self._prev = torch.distributed.get_global_rank(group, (rank - 1) % size)
            self._groups = {ACTIVATION: group, GRADIENT: torch.distributed.group.WORLD}
            self._device = torch.device("cuda", torch.cuda.current_device()) \
                if torch.cuda.is_available() else torch.device("cpu")

    def send(self, tensor: torch.Tensor, kind: str, release_key) -> None:
        """Activations go to the next stage, gradients to the previous one."""
        tensor = tensor.detach().contiguous()
        if self._local is not None:
            self._local[kind].append(tensor)
            return
        peer = self._next if kind == ACTIVATION else self._prev
        work = torch.distributed.isend(tensor, peer, group=self._groups[kind])
        self._pending.setdefault(release_key, []).append((tensor, work))

    def receive(self, shape, kind: str) -> torch.Tensor:
        if self._local is not None:
            return self._local[kind].popleft()
        buffer = torch.empty(shape, dtype=self.dtype, device=self._device)
        peer = self._prev if kind == ACTIVATION else self._next
        torch.distributed.irecv(buffer, peer, group=self._groups[kind]).wait()
        return buffer

    def release(self, key) -> None:
        """Wait for sends known to have been received (returns at once), freeing their buffers."""
        for _, work in self._pending.pop(key, []):
            work.wait()

    def drain(self) -> None:
        for key in list(self._pending):
            self.release(key)


def forward_backward_loops(
    model: torch.nn.Module,
    micro_batches: Sequence[dict],
    loss_func: LossFunc | None,
    num_loops: int | None = None,
    logit_loops=None,
    compute_logits: bool = True,
    forward_only: bool = False,
    schedule: str = "1f1b",
) -> list:
    """Run every micro-batch through ``num_loops`` loops on this rank's pipeline stage.

    A micro-batch is a dict with ``input_ids`` [b, s] and optionally ``position_ids``,
    ``attention_mask`` and ``readout_transform`` (applied to each loop's readout on the last
    stage, see ``LoopGPTModel.finish_loop``). On the last stage,
    ``loss_func(micro_batch, LoopOutput)`` returns the scalar to back-propagate (already
    normalized by the caller: ``nemo_loop.algorithms.common.train_step`` makes it the
    micro-batch's share of the step's loss) and a dict of metrics. Returns, on the
    last stage, per micro-batch the metrics dict — or, when ``loss_func`` is None
    (forward_only), the ``LoopOutput`` itself. Other stages return [].
    ``schedule``: ``"1f1b"`` or the memory-unbounded ``"gpipe"`` (see the module docstring).
    """
    stage = unwrap_model(model)
    if not isinstance(stage, LoopGPTModel):
        raise TypeError(f"forward_backward_loops needs a LoopGPTModel (DDP/Float16Module-wrapped "
                        f"or not), got {type(stage).__name__}")
    num_loops = check_num_loops(stage.num_loops if num_loops is None else num_loops,
                                stage.num_loops)
    logit_loops = check_logit_loops(logit_loops, num_loops)
    if loss_func is None and not forward_only:
        raise ValueError("a loss_func is needed unless forward_only=True")
    pipeline_size = parallel_state.get_pipeline_model_parallel_world_size()
    count = len(micro_batches)
    limit = in_flight_limit(schedule, pipeline_size, count, num_loops)
    if forward_only:
        ops = forward_only_order(count, num_loops, pipeline_size)
    else:
        ops = stage_orders(pipeline_size, count, num_loops, limit)[
            parallel_state.get_pipeline_model_parallel_rank()]
    run = _StageRun(stage, micro_batches, num_loops, logit_loops, compute_logits, loss_func,
                    forward_only, _Channel(stage.config, pipeline_size))
    grad_context = torch.no_grad() if forward_only else torch.enable_grad()
    with grad_context:
        for op in ops:
            (run.backward if op.backward else run.forward)(op)
    run.channel.drain()
    return run.results if run.last else []


class _StageRun:
    """One call's chunks on this stage: runs forward and backward ops in the schedule's order."""

    def __init__(self, stage, micro_batches, num_loops, logit_loops, compute_logits, loss_func,
                 forward_only, channel: _Channel):
        self.stage, self.micro_batches, self.num_loops = stage, micro_batches, num_loops
        self.logit_loops, self.compute_logits = logit_loops, compute_logits
        self.loss_func, self.forward_only, self.channel = loss_func, forward_only, channel
        self.first = parallel_state.is_pipeline_first_stage()
        self.last = parallel_state.is_pipeline_last_stage()
        self.states = [_MicroBatchState() for _ in micro_batches]
        self.chunks: dict[tuple[int, int], _Chunk] = {}
        self.results: list = [None] * len(micro_batches)

    def forward(self, op: ChunkOp) -> None:
        loop, index = op.loop, op.micro_batch
        batch, state = self.micro_batches[index], self.states[index]
        if state.rotary is None:
            state.rotary = self.stage.rotary_embedding(batch["input_ids"].shape[1])
        if self.first and loop == 1:
            leaf = None
            hidden_in = self.stage.embed(batch["input_ids"], batch.get("position_ids"))
        else:
            leaf = self.channel.receive(_hidden_shape(batch, self.stage.config), ACTIVATION)
            hidden_in = leaf.requires_grad_(not self.forward_only)
        output = self.stage.run_shared_layers(hidden_in, batch.get("attention_mask"),
                                              state.rotary)
        if self.last:
            output = self.stage.finish_loop(output, loop, batch.get("readout_transform"))
        chunk = _Chunk(input=leaf, output=output)
        final = self.last and loop == self.num_loops
        if self.last:
            chunk.readout = output.detach().requires_grad_(not self.forward_only)
            state.readouts.append(chunk.readout)
        if not final:
            # received by the next stage before the gradient of this chunk's output comes back
            self.channel.send(output, ACTIVATION, release_key=(loop, index))
        if not self.forward_only:
            self.chunks[(loop, index)] = chunk
        if final:
            self.results[index] = self._finish_micro_batch(batch, state)
            state.readouts = []

    def _finish_micro_batch(self, batch, state):
        output = self.stage.loop_output(state.readouts, self.logit_loops, self.compute_logits)
        if self.loss_func is None:
            return output
        loss, metrics = self.loss_func(batch, output)
        if not self.forward_only:
            loss.backward()
        return metrics

    def backward(self, op: ChunkOp) -> None:
        loop, index = op.loop, op.micro_batch
        chunk = self.chunks.pop((loop, index))
        shape = _hidden_shape(self.micro_batches[index], self.stage.config)
        grad = None
        if self.last:
            grad = chunk.readout.grad
            if loop < self.num_loops:
                from_next_loop = self.channel.receive(shape, GRADIENT)
                grad = from_next_loop if grad is None else grad + from_next_loop
        else:
            grad = self.channel.receive(shape, GRADIENT)
        # The gradient just received was sent after the receiver got this chunk's activation,
        # and after the previous stage got the gradient this stage sent for loop + 1.
        self.channel.release((loop, index))
        self.channel.release(("grad", loop + 1, index))
        if not chunk.output.requires_grad:
            # Frozen layers (Stage II trains the exit gate alone) build no graph: the readouts
            # carried the loss's gradient to the gate, and nothing upstream wants one.
            if not (self.first and self.last):
                raise RuntimeError("a stage whose layers are all frozen cannot pass gradients "
                                   "to another pipeline stage")
            return
        if grad is None:
            grad = torch.zeros_like(chunk.output)
        torch.autograd.backward(chunk.output, grad_tensors=grad)
        if not (self.first and loop == 1):
            self.channel.send(chunk.input.grad, GRADIENT, release_key=("grad", loop, index))


def _hidden_shape(batch, config) -> tuple[int, int, int]:
    batch_size, seq = batch["input_ids"].shape
    if config.sequence_parallel:
        seq //= config.tensor_model_parallel_size
    return (seq, batch_size, config.hidden_size)
