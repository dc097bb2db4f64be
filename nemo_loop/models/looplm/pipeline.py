"""Loop-aware pipeline schedule: every micro-batch passes through the shared layers R̃ times.

Layout: pipeline stage p holds layers [p·L/P, (p+1)·L/P) of the L shared layers; stage 0 also
holds the embedding, stage P−1 the final norm, head and exit gate. A *chunk* is one
(loop, micro-batch) pass through one stage. The last stage sends a loop's output back to the
first stage as the next loop's input (megatron-core's p2p ring already wraps P−1 → 0), so a
micro-batch visits stage p exactly R̃ times.

Order: loop-major waves, ``for loop: for micro_batch:`` forward on every stage, then the same
chunks backwards in reverse. While stage 0 starts loop r+1 of micro-batch m, the later stages
are still on loop r of micro-batches m+1.., so with M ≥ P micro-batches the pipeline stays full
apart from the first fill and last drain. Like GPipe, activations of all chunks are kept until
the backward wave.

Gradients across loops: a last-stage loop output y_r is both the readout of loop r (used by
the loss) and the input of loop r+1 (on stage 0). The loss sees a detached copy of y_r, so the
backward of the loss yields ∂L/∂readout_r without touching the layers; the chunk's own backward
later runs once with ∂L/∂readout_r + ∂L/∂input_{r+1} (received from stage 0). Sends are
non-blocking and receives blocking, which cannot deadlock because every stage walks the same
chunk order, consistent with the data dependencies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from nemo_loop.models.looplm.model import (
    LoopGPTModel,
    LoopOutput,
    check_logit_loops,
    check_num_loops,
)

LossFunc = Callable[[dict, LoopOutput], tuple[torch.Tensor, dict]]


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
    """Stage-to-stage hand-off: p2p over the pipeline ring, or a local queue when PP=1."""

    def __init__(self, config, pipeline_size: int):
        self._local = deque() if pipeline_size == 1 else None
        self._p2p = None if pipeline_size == 1 else P2PCommunicator(
            parallel_state.get_pipeline_model_parallel_group(), config)
        self._pending = []
        self.dtype = config.pipeline_dtype

    def send_next(self, tensor: torch.Tensor) -> None:
        self._send(tensor, forward=True)

    def send_prev(self, tensor: torch.Tensor) -> None:
        self._send(tensor, forward=False)

    def recv_prev(self, shape) -> torch.Tensor:
        return self._recv(shape, forward=True)

    def recv_next(self, shape) -> torch.Tensor:
        return self._recv(shape, forward=False)

    def _send(self, tensor, forward):
        tensor = tensor.detach().contiguous()
        if self._local is not None:
            self._local.append(tensor)
            return
        _, _, reqs = self._p2p._communicate(
            tensor_send_next=tensor if forward else None,
            tensor_send_prev=None if forward else tensor,
            recv_prev=False, recv_next=False, tensor_shape=None, wait_on_reqs=False)
        self._pending.append((tensor, reqs))

    def _recv(self, shape, forward):
        if self._local is not None:
            return self._local.popleft()
        received_prev, received_next, _ = self._p2p._communicate(
            tensor_send_next=None, tensor_send_prev=None, recv_prev=forward,
            recv_next=not forward, tensor_shape=shape, wait_on_reqs=True)
        return (received_prev if forward else received_next).detach()

    def drain(self) -> None:
        for _, reqs in self._pending:
            for req in (reqs.values() if isinstance(reqs, dict) else reqs or []):
                req.wait()
        self._pending.clear()


def forward_backward_loops(
    model: torch.nn.Module,
    micro_batches: Sequence[dict],
    loss_func: LossFunc | None,
    num_loops: int | None = None,
    logit_loops=None,
    compute_logits: bool = True,
    forward_only: bool = False,
) -> list:
    """Run every micro-batch through ``num_loops`` loops on this rank's pipeline stage.

    A micro-batch is a dict with ``input_ids`` [b, s] and optionally ``position_ids`` and
    ``attention_mask``. On the last stage, ``loss_func(micro_batch, LoopOutput)`` returns the
    scalar to back-propagate (already scaled by the caller, e.g. by 1/num_micro_batches) and a
    dict of metrics. Returns, on the last stage, per micro-batch the metrics dict — or, when
    ``loss_func`` is None (forward_only), the ``LoopOutput`` itself. Other stages return [].
    """
    stage = unwrap_model(model)
    num_loops = check_num_loops(stage.num_loops if num_loops is None else num_loops,
                                stage.num_loops)
    logit_loops = check_logit_loops(logit_loops, num_loops)
    if loss_func is None and not forward_only:
        raise ValueError("a loss_func is needed unless forward_only=True")
    config = stage.config
    pipeline_size = parallel_state.get_pipeline_model_parallel_world_size()
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    channel = _Channel(config, pipeline_size)
    states = [_MicroBatchState() for _ in micro_batches]
    chunks: dict[tuple[int, int], _Chunk] = {}
    results: list = [None] * len(micro_batches)

    grad_context = torch.no_grad() if forward_only else torch.enable_grad()
    with grad_context:
        for loop in range(1, num_loops + 1):
            for index, batch in enumerate(micro_batches):
                state = states[index]
                shape = _hidden_shape(batch, config)
                if state.rotary is None:
                    state.rotary = stage.rotary_embedding(batch["input_ids"].shape[1])
                if first and loop == 1:
                    hidden_in, leaf = stage.embed(batch["input_ids"], batch.get("position_ids")), None
                else:
                    leaf = channel.recv_prev(shape).requires_grad_(not forward_only)
                    hidden_in = leaf
                output = stage.run_shared_layers(hidden_in, batch.get("attention_mask"),
                                                 state.rotary)
                chunk = _Chunk(input=leaf, output=output)
                if last:
                    chunk.readout = output.detach().requires_grad_(not forward_only)
                    state.readouts.append(chunk.readout)
                if not (last and loop == num_loops):
                    channel.send_next(output)
                if not forward_only:
                    chunks[(loop, index)] = chunk
                if last and loop == num_loops:
                    results[index] = _finish_micro_batch(stage, batch, state, logit_loops,
                                                         compute_logits, loss_func, forward_only)
                    state.readouts = []

        if not forward_only:
            _backward_wave(chunks, micro_batches, num_loops, channel, first, last, config)
    channel.drain()
    return results if last else []


def _finish_micro_batch(stage, batch, state, logit_loops, compute_logits, loss_func,
                        forward_only):
    output = stage.readout(state.readouts, logit_loops, compute_logits)
    if loss_func is None:
        return output
    loss, metrics = loss_func(batch, output)
    if not forward_only:
        loss.backward()
    return metrics


def _backward_wave(chunks, micro_batches, num_loops, channel, first, last, config):
    for loop in range(num_loops, 0, -1):
        for index in reversed(range(len(micro_batches))):
            chunk = chunks.pop((loop, index))
            shape = _hidden_shape(micro_batches[index], config)
            grad = None
            if last:
                grad = chunk.readout.grad
                if loop < num_loops:
                    from_next_loop = channel.recv_next(shape)
                    grad = from_next_loop if grad is None else grad + from_next_loop
            else:
                grad = channel.recv_next(shape)
            if grad is None:
                grad = torch.zeros_like(chunk.output)
            torch.autograd.backward(chunk.output, grad_tensors=grad)
            if not (first and loop == 1):
                channel.send_prev(chunk.input.grad)


def _hidden_shape(batch, config) -> tuple[int, int, int]:
    batch_size, seq = batch["input_ids"].shape
    if config.sequence_parallel:
        seq //= config.tensor_model_parallel_size
    return (seq, batch_size, config.hidden_size)


def unwrap_model(model) -> LoopGPTModel:
    """The LoopGPTModel inside DDP/Float16 wrappers."""
    while not isinstance(model, LoopGPTModel):
        model = model.module
    return model
