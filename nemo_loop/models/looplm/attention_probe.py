"""Record what one shared layer's core attention sees, loop by loop.

A LoopLM applies the same layer once per loop, so its core attention is called R̃ times per
micro-batch. ``AttentionProbe`` hooks it (a forward pre-hook; the values are unchanged) and
keeps, call by call, the query ``[s, b, heads/TP, head_dim]`` and key
``[s, b, groups/TP, head_dim]`` after RoPE, so that a loss on attention rows can train the layer
(OISD's attention term). Under tensor parallelism each rank holds its own heads. Only the
whole-model path (PP = 1) is supported, without activation recompute (a recomputed layer calls
its core attention again inside backward; OISD's config refuses the combination).

Gradients follow the loop pipeline's rule for readouts (``pipeline.py``): the loss runs its
backward as soon as a micro-batch's last loop is done, long before the backward wave reaches the
layer, so the probe hands the loss *detached* copies and the layer sees the query and key
through an identity whose backward adds whatever gradient those copies received. Each chunk's
graph is thus traversed exactly once, with the attention term's gradient included. A caller
that runs one plain forward and backward (no loop pipeline) passes ``pipelined=False`` and gets
the tensors of the graph itself.

    with AttentionProbe(model, layer=-1) as probe:
        forward_backward_loops(model, micro_batches, loss_func, ...)
        # inside loss_func(micro_batch, output):
        query, key = probe.query_key(micro_batch["attention_mask"], loop)
"""

from __future__ import annotations

import math

import torch
from megatron.core.utils import unwrap_model


class AttentionProbe:
    """Calls are kept per micro-batch — keyed by the attention-mask tensor the micro-batch
    passes through every loop — in loop order, whatever order a schedule runs the chunks in."""

    def __init__(self, model: torch.nn.Module, layer: int, pipelined: bool = True):
        stage = unwrap_model(model)
        if not (stage.pre_process and stage.post_process):
            raise ValueError("AttentionProbe needs the whole model on one stage (PP = 1)")
        layers = stage.decoder.layers
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"attention layer {layer} does not exist: the model has "
                             f"{len(layers)} shared layers (0..{len(layers) - 1}, or negative "
                             f"from the end)")
        self.core_attention = layers[layer].self_attention.core_attention
        # megatron's DotProductAttention, SDPAttention and TE's all scale q·k by softmax_scale.
        scale = getattr(self.core_attention, "softmax_scale", None)
        self.softmax_scale = float(scale) if scale else 1.0 / math.sqrt(stage.config.kv_channels)
        self.pipelined = pipelined
        self._calls: dict[int, tuple[object, list]] = {}
        self._handle = None

    def _record(self, module, args, kwargs):
        if len(args) < 4:
            raise TypeError("the probed core attention must receive query, key, value and "
                            "attention mask positionally, as megatron's Attention passes them")
        query, key, mask = args[0], args[1], args[3]
        # The mask is kept with the calls, so its id cannot be reused while they are held.
        calls = self._calls.setdefault(id(mask), (mask, []))[1]
        if not self.pipelined:
            calls.append((query, key))
            return None
        if not torch.is_grad_enabled() or not (query.requires_grad or key.requires_grad):
            calls.append((query.detach(), key.detach()))
            return None
        taps = [tensor.detach().requires_grad_(True) for tensor in (query, key)]
        calls.append(tuple(taps))
        tapped = tuple(_AddTapGradient.apply(tensor, tap) for tensor, tap in zip(args, taps))
        return tapped + tuple(args[2:]), kwargs

    def __enter__(self) -> AttentionProbe:
        self._calls = {}
        self._handle = self.core_attention.register_forward_pre_hook(self._record,
                                                                     with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None
        self._calls = {}

    def query_key(self, attention_mask, loop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, key) of loop ``loop`` (1-based) of the micro-batch whose attention mask is
        ``attention_mask`` (the very tensor its dict holds; None for no mask)."""
        calls = self._calls.get(id(attention_mask), (None, []))[1]
        if not 1 <= loop <= len(calls):
            raise IndexError(f"the probed attention ran {len(calls)} loops for this micro-batch; "
                             f"loop {loop} was asked for")
        return calls[loop - 1]


class _AddTapGradient(torch.autograd.Function):
    """Identity; its backward adds the gradient that ``tap`` (a detached copy of the input)
    received from a loss that ran its backward earlier."""

    @staticmethod
    def forward(ctx, tensor, tap):
        ctx.tap = tap
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        extra = ctx.tap.grad
        return (grad if extra is None else grad + extra), None
