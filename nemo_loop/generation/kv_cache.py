"""KV caches for a looped model: one (key, value) buffer per (loop, layer), for the loops run.

Two implementations with one interface (used by ``native.NativeLoopEngine``):

* ``RopeOnceKVCache`` (default): stores keys *after* RoPE, so each token is rotated once.
* ``MegatronStaticKVCache``: one megatron-core ``StaticInferenceContext`` per loop.

Why two. megatron's static path (below) is correct on CPU, but it caches keys before RoPE and
re-rotates the whole cached prefix in every layer call of every step; on the mid-size CPU
benchmark that re-rotation (plus its cos/sin/cat temporaries) was ~30% of a decode step, and it
grows with the context. ``RopeOnceKVCache`` runs the model's layers with no inference context,
so megatron rotates only the new tokens (the engine passes the rotary table rows of their slots)
and a forward pre-hook on each layer's ``core_attention`` swaps the new keys/values for the
cached prefix + new ones. The hooks live only while a ``generate`` call runs.

Adaptive exit (``adaptive.py``) needs ``RopeOnceKVCache``: a loop may run on a subset of the
batch rows (``context_for(loop, rows)``: the new keys/values go to those rows, attention reads
those rows' prefix), and the slots of the loops an exited token skipped are written directly
(``slot_key_values`` / ``write_slot``). Buffers are allocated uninitialised; with
``POISON_NEW_BUFFERS`` (a test switch) they start as NaN and every read of the cached prefix
is checked, so a slot left unwritten fails loudly.

MegatronStaticKVCache, in detail:

megatron-core's attention keeps its static-batching cache in
``inference_context.key_value_memory_dict[layer_number]`` and allocates an entry the first time a
layer sees the context. A looped model runs the *same* layers (same ``layer_number``) once per
loop, so a single context would make loop 2 overwrite loop 1's keys. Handing each loop its own
context gives exactly one ``[slots, batch, groups/TP, head_dim]`` key and value buffer per
(loop, layer), and only for the loops that actually run: a call with num_loops=2 on an R=4 model
allocates 2·L entries, not R·L.

megatron stores keys *before* RoPE and rotates the whole cached prefix at each step, indexing the
rotary table by cache slot. With left padding every row's slot = its position + its pad count,
and RoPE scores depend only on slot differences, so a padded row attends exactly as it would
alone (the pads themselves are masked out).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.enums import AttnMaskType

# Tests set this: new buffers are filled with NaN and every read of a prefix is checked for NaN.
POISON_NEW_BUFFERS = False


class MegatronStaticKVCache:
    """Per-loop static KV caches for one batch; slots are shared by all rows (left padding)."""

    def __init__(self, num_loops: int, batch_size: int, num_slots: int):
        self.num_slots = num_slots
        self.contexts = [StaticInferenceContext(batch_size, num_slots) for _ in range(num_loops)]

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module) -> Iterator[None]:
        yield

    def context_for(self, loop: int, rows: torch.Tensor | None = None) -> StaticInferenceContext:
        if rows is not None:
            raise NotImplementedError("MegatronStaticKVCache runs every loop on all rows; "
                                      "adaptive exit with kv_fill copy/propagate needs the "
                                      "rope_once cache")
        return self.contexts[loop]

    def rotary_for(self, rotary_table: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return rotary_table  # megatron slices it by sequence_len_offset itself

    def start_prefill(self) -> None:
        for context in self.contexts:
            context.reset()

    def start_decode_at(self, slot: int) -> None:
        """The next forward writes its single token's keys/values at ``slot``."""
        if slot >= self.num_slots:
            raise RuntimeError(f"KV cache has {self.num_slots} slots; cannot write slot {slot}")
        for context in self.contexts:
            context.sequence_len_offset = slot
            context.enable_decode_mode()

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows so that later steps neither compute nor attend over them."""
        for context in self.contexts:
            memory = context.key_value_memory_dict
            for layer_number, (keys, values) in memory.items():
                memory[layer_number] = (keys.index_select(1, rows), values.index_select(1, rows))

    @property
    def num_entries(self) -> int:
        """Allocated (loop, layer) buffers; equals num_loops × layers after the prefill."""
        return sum(len(context.key_value_memory_dict) for context in self.contexts)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for context in self.contexts
                   for pair in context.key_value_memory_dict.values() for t in pair)


class RopeOnceKVCache:
    """Post-RoPE key/value buffers [slots, batch, groups/TP, head_dim] per (loop, layer)."""

    def __init__(self, num_loops: int, batch_size: int, num_slots: int):
        self.num_loops = num_loops
        self.num_slots = num_slots
        self.batch_size = batch_size
        self.buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.loop = 0
        self.rows: torch.Tensor | None = None  # batch rows the running loop feeds (None: all)
        self.slot = 0

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module) -> Iterator[None]:
        handles = [layer.self_attention.core_attention.register_forward_pre_hook(
                       self._hook(index), with_kwargs=True)
                   for index, layer in enumerate(model.decoder.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def context_for(self, loop: int, rows: torch.Tensor | None = None) -> None:
        """The next layer calls are loop ``loop`` (0-based) on batch rows ``rows`` (None: all)."""
        self.loop, self.rows = loop, rows
        return None

    def rotary_for(self, rotary_table: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return rotary_table[start:end]

    def start_prefill(self) -> None:
        self.slot = 0

    def start_decode_at(self, slot: int) -> None:
        if slot >= self.num_slots:
            raise RuntimeError(f"KV cache has {self.num_slots} slots; cannot write slot {slot}")
        self.slot = slot

    def keep_rows(self, rows: torch.Tensor) -> None:
        for key, (keys, values) in self.buffers.items():
            self.buffers[key] = (keys.index_select(1, rows), values.index_select(1, rows))
        self.batch_size = len(rows)

    def slot_key_values(self, loop: int, layer_index: int, rows: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, value) [1, n, groups/TP, head_dim] that ``rows`` wrote at the current slot in
        (``loop``, layer)."""
        keys, values = self.buffers[(loop, layer_index)]
        return (keys[self.slot:self.slot + 1].index_select(1, rows),
                values[self.slot:self.slot + 1].index_select(1, rows))

    def write_slot(self, loop: int, layer_index: int, rows: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor) -> None:
        """Write ``rows``' (key, value) [1, n, groups/TP, head_dim] at the current slot."""
        keys, values = self.buffers[(loop, layer_index)]
        keys[self.slot:self.slot + 1].index_copy_(1, rows, key.to(keys.dtype))
        values[self.slot:self.slot + 1].index_copy_(1, rows, value.to(values.dtype))

    @property
    def num_entries(self) -> int:
        return len(self.buffers)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.buffers.values() for t in pair)

    def _hook(self, layer_index: int):
        def use_cached_prefix(module, args, kwargs):
            query, key, value, *rest = args
            keys, values = self._buffers_for(layer_index, key)
            end = self.slot + key.shape[0]
            if end > self.num_slots:
                raise RuntimeError(f"KV cache has {self.num_slots} slots; cannot fill to {end}")
            if self.rows is None:
                keys[self.slot:end] = key
                values[self.slot:end] = value
                prefix = keys[:end], values[:end]
            else:  # a loop running on some rows only (adaptive exit)
                keys[self.slot:end].index_copy_(1, self.rows, key)
                values[self.slot:end].index_copy_(1, self.rows, value)
                prefix = keys[:end].index_select(1, self.rows), \
                    values[:end].index_select(1, self.rows)
            if POISON_NEW_BUFFERS:
                self._check_written(layer_index, *prefix)
            if self.slot > 0 and len(rest) > 0 and rest[0] is None:
                # Decode without padding: the new tokens see the whole prefix. (megatron's
                # DotProductAttention ignores the type; SDPAttention and TE honour it and must
                # not apply a top-left-aligned causal mask to sq < sk.)
                kwargs = {**kwargs, "attn_mask_type": AttnMaskType.no_mask}
            return (query, *prefix, *rest), kwargs

        return use_cached_prefix

    def _buffers_for(self, layer_index: int, key: torch.Tensor):
        entry = (self.loop, layer_index)
        if entry not in self.buffers:
            shape = (self.num_slots, self.batch_size, *key.shape[2:])
            if POISON_NEW_BUFFERS:
                self.buffers[entry] = (key.new_full(shape, float("nan")),
                                       key.new_full(shape, float("nan")))
            else:
                self.buffers[entry] = (key.new_empty(shape), key.new_empty(shape))
        return self.buffers[entry]

    def _check_written(self, layer_index: int, keys: torch.Tensor, values: torch.Tensor):
        if bool(keys.isnan().any() or values.isnan().any()):
            slots = (keys.isnan() | values.isnan()).flatten(1).any(1).nonzero().flatten()
            raise RuntimeError(f"KV cache read unwritten slots {slots.tolist()} of loop "
                               f"{self.loop + 1}, layer {layer_index}")
