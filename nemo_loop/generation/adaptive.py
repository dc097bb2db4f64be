"""Adaptive loop exit in the native engine: one forward whose rows stop looping at their own loop.

``adaptive_forward`` runs the loops of one prefill or decode step through the model's loop API
(``embed``, ``run_loop``, ``logits``, ``exit_logits``, ``key_value_projection``) and asks the
policy (``exit.ExitDecider``) after each loop which rows of the last position exit. A row's
token is then read out from its exit loop: the head sees each row's exit readout once (or, for
the policies that read loop r's distribution, its logits at that loop are kept).

What happens to the loops an exited row skipped is ``kv_fill``:

* ``compute``, and always in the prefill: every row keeps running every loop, for the keys and
  values later tokens attend to; only the readout is chosen. Exact, saves nothing.
* ``copy`` / ``propagate`` (decode): the row leaves the loop's active set — the next loop runs on
  fewer rows with their KV rows (``RopeOnceKVCache.context_for(loop, rows)``), so the FLOPs
  saved are real — and its slot in every deeper (loop, layer) cache is written now: with the
  exit loop's own key/value (copy) or with the key/value each layer computes from the exit
  readout (propagate, ``LoopGPTModel.key_value_projection``). No slot is left unwritten.

``oracle`` needs loop R̃'s argmax, so every row runs every loop; with copy/propagate the deeper
slots of each row are overwritten afterwards from its exit loop, which isolates the error the
fill itself makes (the tokens of greedy decoding are those of loop R̃ by construction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from nemo_loop.generation.exit import (
    LOGIT_POLICIES,
    ExitConfig,
    ExitDecider,
    vocab_parallel_argmax,
)


@dataclass
class ExitReadout:
    logits: torch.Tensor  # [b, V] fp32, full vocabulary, of each row's exit loop
    exit_loops: torch.Tensor  # [b] long, 1-based


def adaptive_forward(model, config: ExitConfig, num_loops: int, input_ids: torch.Tensor,
                     position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     rotary_pos_emb: torch.Tensor | None, cache, decode: bool) -> ExitReadout:
    """Feed ``input_ids`` [b, s] (prefill: the prompts; decode: one token per row) through up
    to ``num_loops`` loops with the adaptive exit ``config``; the exit readout of the last
    position of every row. ``cache``: the step's KV cache (None: no cache, every loop runs)."""
    batch = input_ids.shape[0]
    if rotary_pos_emb is None:  # no KV cache: the sequence is fed from its first slot
        rotary_pos_emb = model.rotary_embedding(input_ids.shape[1])
    compact = decode and config.kv_fill != "compute" and config.policy != "oracle"
    run = _Run(model, config, num_loops, batch, cache, rotary_pos_emb, input_ids.device)
    hidden = model.embed(input_ids, position_ids)
    active = torch.arange(batch, device=input_ids.device)
    for loop in range(1, num_loops + 1):
        rows = None if len(active) == batch else active
        context = None if cache is None else cache.context_for(loop - 1, rows)
        mask = attention_mask if attention_mask is None or rows is None \
            else attention_mask.index_select(0, rows)
        hidden = model.run_loop(hidden, loop, attention_mask=mask, rotary_pos_emb=rotary_pos_emb,
                                inference_context=context)
        exited = run.record(loop, hidden[-1], active)
        if compact and loop < num_loops and bool(exited.any()):
            run.fill_skipped(loop, active[exited], hidden[-1][exited])
            stay = ~exited
            active, hidden = active[stay], hidden[:, stay]
            if len(active) == 0:
                break
    if config.policy == "oracle":
        run.decide_oracle(decode)
    return run.readout()


class _Run:
    """The exit bookkeeping of one ``adaptive_forward``: per batch row its exit loop, its exit
    readout (or exit logits) and, for the oracle, every loop's argmax."""

    def __init__(self, model, config: ExitConfig, num_loops: int, batch: int, cache,
                 rotary_pos_emb, device: torch.device):
        self.model, self.config, self.num_loops, self.cache = model, config, num_loops, cache
        self.rotary = rotary_pos_emb
        self.decider = ExitDecider(
            config, num_loops, batch, lambda readout: model.exit_logits(readout[None, None])[0, 0])
        self.exit_loops = torch.full((batch,), num_loops, dtype=torch.long, device=device)
        self.decided = torch.zeros(batch, dtype=torch.bool, device=device)
        self.readouts: torch.Tensor | None = None  # [b, h] exit readouts
        self.logits: torch.Tensor | None = None  # [b, V/TP] exit logits (logit policies)
        self.per_loop: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # oracle

    def record(self, loop: int, readout: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Loop ``loop``'s last-position readout [n, h] of the batch rows ``active``: the rows
        that exit now (bool [n]); a row that exited earlier keeps its first exit."""
        logits = self.model.logits([readout[None]])[0, 0] \
            if self.config.policy in LOGIT_POLICIES else None
        if self.readouts is None:
            self.readouts = readout.new_empty(len(self.exit_loops), readout.shape[-1])
            if logits is not None:
                self.logits = logits.new_empty(len(self.exit_loops), logits.shape[-1])
        if self.config.policy == "oracle":
            self.per_loop.append((readout, logits, vocab_parallel_argmax(logits)))
            return torch.zeros(len(active), dtype=torch.bool, device=readout.device)
        exits = self.decider.after_loop(loop, readout, active, logits)
        new = exits & ~self.decided[active]
        rows = active[new]
        self.exit_loops[rows] = loop
        self.decided[rows] = True
        self.readouts[rows] = readout[new]
        if logits is not None:
            self.logits[rows] = logits[new]
        return new

    def decide_oracle(self, decode: bool) -> None:
        """Every loop ran on every row: each row's exit is the earliest loop agreeing with loop
        R̃; with copy/propagate (decode) the deeper slots are refilled from that loop."""
        exit_loops = self.decider.oracle_exits(torch.stack([a for _, _, a in self.per_loop]))
        self.exit_loops = exit_loops
        index = exit_loops - 1
        readouts = torch.stack([r for r, _, _ in self.per_loop])  # [R̃, b, h]
        logits = torch.stack([z for _, z, _ in self.per_loop])  # [R̃, b, V/TP]
        rows = torch.arange(readouts.shape[1], device=index.device)
        self.readouts, self.logits = readouts[index, rows], logits[index, rows]
        if decode and self.config.kv_fill != "compute":
            for loop in range(1, self.num_loops):
                chosen = (index == loop - 1).nonzero().flatten()
                if len(chosen):
                    self.fill_skipped(loop, chosen, readouts[loop - 1, chosen])

    def fill_skipped(self, loop: int, rows: torch.Tensor, readout: torch.Tensor) -> None:
        """Write the current slot of ``rows`` (exited after ``loop``) in every deeper loop."""
        cache, layers = self.cache, range(len(self.model.decoder.layers))
        if self.config.kv_fill == "copy":
            filled = [cache.slot_key_values(loop - 1, layer, rows) for layer in layers]
        else:
            filled = self.model.key_value_projection(readout[None], self.rotary)
        for deeper in range(loop, self.num_loops):  # 0-based ids of loops loop+1..R̃
            for layer, (key, value) in zip(layers, filled):
                cache.write_slot(deeper, layer, rows, key, value)

    def readout(self) -> ExitReadout:
        logits = self.logits if self.logits is not None else \
            self.model.logits([self.readouts[None]])[0, 0]
        return ExitReadout(gather_from_tensor_model_parallel_region(logits).float(),
                           self.exit_loops)


def check_engine_supports(config: ExitConfig, kv_cache: str | None) -> None:
    """copy/propagate fill and shrink the rope_once cache per loop; compute runs every loop and
    works with any cache (``kv_cache=None``: the no-cache engine)."""
    if config.adaptive and config.kv_fill != "compute" and kv_cache != "rope_once":
        raise ValueError(f"generation.exit.kv_fill={config.kv_fill} needs the native engine's "
                         f"rope_once KV cache (this engine: "
                         f"{'no KV cache' if kv_cache is None else kv_cache})")
