"""Native on-policy generation on the megatron-core LoopGPTModel.

One call: left-pad the prompts, run a batched prefill through ``num_loops`` loops (filling one KV
cache per (loop, layer)), then decode one token per step. Each step's final-loop hidden state of
the last position alone goes through the vocab-parallel head; the shards are all-gathered so
every tensor-parallel rank samples from the same full-vocabulary logits with the same
``torch.Generator``, and the tokens are broadcast from the group's first rank so the ranks can
never diverge. Rows that stop are dropped from the batch and their caches compacted, so finished
sequences cost nothing afterwards. With an adaptive exit policy (``SamplingParams.exit``) each
step's loops run through ``adaptive.adaptive_forward``: rows stop looping at their own loop.

Tensor parallelism is supported; pipeline and sequence parallelism are not (a decode step is a
single token, which sequence parallelism cannot split, and a looped pipeline would need the
loop schedule in ``nemo_loop.models.looplm.pipeline`` per token).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.utils import unwrap_model

from nemo_loop.generation.engine import (
    GenerationEngine,
    GenerationResult,
    RefitReport,
    SamplingParams,
    validate_prompts,
)
from nemo_loop.generation.adaptive import adaptive_forward, check_engine_supports
from nemo_loop.generation.exit import check_model_supports
from nemo_loop.generation.kv_cache import MegatronStaticKVCache, RopeOnceKVCache
from nemo_loop.models.looplm.model import LoopGPTModel, check_num_loops

KV_CACHES = {"rope_once": RopeOnceKVCache, "megatron_static": MegatronStaticKVCache}
PAD_TOKEN_ID = 0  # any valid id: padded positions are masked out of every attention


class NativeLoopEngine(GenerationEngine):
    """Generates with a LoopGPTModel in this process (colocated with the trainer).

    ``owns_weights=False`` (default): the engine runs the module it is given, and ``refit(m)``
    rebinds it to the trainer's module: zero copies. ``owns_weights=True``: the engine keeps its
    own model (e.g. a bf16 copy) and ``refit`` copies the trainer's tensors into it: one copy.
    ``use_kv_cache=False`` recomputes the whole sequence every step (a reference and benchmark
    baseline); ``kv_cache`` picks the cache implementation (see ``kv_cache.py``).
    ``max_batch_size`` splits large prompt lists into sequential batches.
    """

    def __init__(self, model: torch.nn.Module, *, owns_weights: bool = False,
                 use_kv_cache: bool = True, kv_cache: str = "rope_once",
                 max_batch_size: int | None = None):
        if kv_cache not in KV_CACHES:
            raise ValueError(f"unknown kv_cache {kv_cache!r}; choose one of {tuple(KV_CACHES)}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.model = _check_supported(unwrap_model(model))
        self.owns_weights = owns_weights
        self.use_kv_cache = use_kv_cache
        self.kv_cache = kv_cache
        self.max_batch_size = max_batch_size

    # ----- GenerationEngine -----

    def generate(self, prompts: list[list[int]], num_loops: int,
                 sampling: SamplingParams) -> list[GenerationResult]:
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        prompts = _as_int_lists(prompts)
        config = self.model.config
        validate_prompts(prompts, config.vocab_size, config.max_sequence_length)
        num_loops = check_num_loops(num_loops, self.model.num_loops)
        sampling.exit.check_loops(num_loops)
        check_model_supports(sampling.exit, self.model)
        check_engine_supports(sampling.exit, self.kv_cache if self.use_kv_cache else None)
        generator = torch.Generator().manual_seed(_shared_seed(sampling.seed))
        batch_size = self.max_batch_size or len(prompts)
        results: list[GenerationResult] = []
        with _inference_mode(self.model):
            for start in range(0, len(prompts), batch_size):
                results += self._generate_batch(prompts[start:start + batch_size], num_loops,
                                                sampling, generator)
        return results

    def refit(self, source: torch.nn.Module | Mapping[str, torch.Tensor]) -> RefitReport:
        start = time.perf_counter()
        if isinstance(source, torch.nn.Module) and not self.owns_weights:
            self.model = _check_supported(unwrap_model(source))
            return RefitReport(mode="rebind", seconds=time.perf_counter() - start)
        if isinstance(source, torch.nn.Module):
            source_tensors = dict(unwrap_model(source).named_parameters())
        elif isinstance(source, Mapping):
            source_tensors = source
        else:
            raise TypeError(f"refit needs a module or a state dict, got {type(source).__name__}")
        copied_bytes, count = _copy_parameters(self.model, source_tensors)
        return RefitReport(mode="copy", seconds=time.perf_counter() - start,
                           bytes_copied=copied_bytes, tensors=count)

    # ----- one batch -----

    def _generate_batch(self, prompts: list[list[int]], num_loops: int,
                        sampling: SamplingParams, generator: torch.Generator):
        batch = _Batch.left_padded(prompts, sampling.max_new_tokens,
                                   self.model.config.max_sequence_length)
        cache = None
        if self.use_kv_cache:
            cache = KV_CACHES[self.kv_cache](num_loops, batch.size, num_slots=batch.num_slots)
            cache.start_prefill()
        with cache.attached(self.model) if cache is not None else contextlib.nullcontext():
            self._prefill_and_decode(batch, num_loops, sampling, generator, cache)
        return batch.results(num_loops)

    def _prefill_and_decode(self, batch: "_Batch", num_loops: int, sampling: SamplingParams,
                            generator: torch.Generator, cache) -> None:
        stop_ids = torch.tensor(sorted(set(sampling.stop_token_ids)), dtype=torch.long)
        rotary_table = None
        if cache is not None:
            rotary_table = self.model.rotary_embedding(cache.num_slots)
        width = batch.prompt_width
        logits, exit_loops = self._next_token_logits(batch, 0, width, num_loops, cache,
                                                     rotary_table, sampling)
        for step in range(sampling.max_new_tokens):
            tokens, logprobs, sampling_logprobs = sample_next_tokens(logits, sampling, generator)
            finished = batch.append(tokens, logprobs, sampling_logprobs, stop_ids, exit_loops)
            if batch.all_done:
                return
            if finished.any():
                keep = (~finished).nonzero().squeeze(1)
                batch.keep_rows(keep)
                if cache is not None:
                    cache.keep_rows(keep)
            slot = width + step  # the slot of the token just sampled
            if cache is not None:
                cache.start_decode_at(slot)
                logits, exit_loops = self._next_token_logits(batch, slot, slot + 1, num_loops,
                                                             cache, rotary_table, sampling)
            else:  # recompute every slot so far
                logits, exit_loops = self._next_token_logits(batch, 0, slot + 1, num_loops,
                                                             None, None, sampling)

    def _next_token_logits(self, batch: "_Batch", start: int, end: int, num_loops: int, cache,
                           rotary_table: torch.Tensor | None, sampling: SamplingParams
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-vocabulary fp32 logits [b, V] of the next token of every active row and the loop
        [b] they were read out from."""
        if not sampling.exit.adaptive:
            logits = self._final_loop_logits(batch, start, end, num_loops, cache, rotary_table)
            return logits, torch.full((batch.size,), num_loops, dtype=torch.long)
        readout = adaptive_forward(
            self.model, sampling.exit, num_loops, batch.tokens[:, start:end],
            batch.positions(start, end), batch.attention_mask(start, end),
            None if cache is None else cache.rotary_for(rotary_table, start, end), cache,
            decode=cache is not None and start > 0)
        return readout.logits, readout.exit_loops

    def _final_loop_logits(self, batch: "_Batch", start: int, end: int, num_loops: int,
                           cache, rotary_table: torch.Tensor | None) -> torch.Tensor:
        """Feed slots [start, end) of the active rows; full-vocabulary fp32 logits [b, V] of the
        final loop at the last slot."""
        loops = self.model.run_loops(
            batch.tokens[:, start:end], num_loops, position_ids=batch.positions(start, end),
            attention_mask=batch.attention_mask(start, end),
            rotary_pos_emb=None if cache is None else cache.rotary_for(rotary_table, start, end),
            inference_context_for=None if cache is None else cache.context_for)
        for readout in loops:  # only the final loop is sampled from; earlier ones are dropped
            pass
        # Only the last position is sampled from: the head (often the largest matmul of a step)
        # sees one token per row.
        logits = self.model.logits([readout[-1:]])[0, 0]  # [b, V/TP]
        return gather_from_tensor_model_parallel_region(logits).float()


# ----- sampling -----

def sample_next_tokens(logits: torch.Tensor, sampling: SamplingParams,
                       generator: torch.Generator):
    """(tokens, model log-probs at T=1, sampling-distribution log-probs), each [b]."""
    model_logprobs = torch.log_softmax(logits, dim=-1)
    if sampling.greedy:
        tokens = logits.argmax(dim=-1)
        sampling_logprobs = torch.zeros(tokens.shape, dtype=logits.dtype)
    else:
        filtered = filter_top_k_top_p(logits / sampling.temperature, sampling.top_k,
                                      sampling.top_p)
        sampling_distribution = torch.log_softmax(filtered, dim=-1)
        tokens = torch.multinomial(sampling_distribution.exp(), 1, generator=generator)[:, 0]
        sampling_logprobs = sampling_distribution.gather(1, tokens[:, None])[:, 0]
    tokens = _same_on_all_tp_ranks(tokens)
    return tokens, model_logprobs.gather(1, tokens[:, None])[:, 0], sampling_logprobs


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set every logit outside the top-k and outside the top-p nucleus to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # A token stays if the more likely tokens alone have not reached top_p; the most likely
        # token always stays.
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# ----- batch bookkeeping -----

@dataclass
class _Batch:
    """Left-padded token buffer of the active rows plus every row's output so far.

    Row r of the buffer holds prompt ``rows[r]``; slot j of a row is position j - pad[r].
    """

    tokens: torch.Tensor  # [active, prompt_width + max_new_tokens] (long)
    valid: torch.Tensor  # [active, same] bool: a real token (not padding) sits in the slot
    pad: torch.Tensor  # [active] long
    rows: torch.Tensor  # [active] long: original prompt index of each buffer row
    budgets: torch.Tensor  # [active] long: tokens this row may still generate
    prompt_width: int
    outputs: list[dict]

    @classmethod
    def left_padded(cls, prompts: list[list[int]], max_new_tokens: int,
                    max_sequence_length: int) -> "_Batch":
        width = max(len(p) for p in prompts)
        tokens = torch.full((len(prompts), width + max_new_tokens), PAD_TOKEN_ID,
                            dtype=torch.long)
        valid = torch.zeros(tokens.shape, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt):width] = torch.tensor(prompt, dtype=torch.long)
            valid[row, width - len(prompt):] = True
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        budgets = torch.clamp(max_sequence_length - lengths, max=max_new_tokens)
        return cls(tokens=tokens, valid=valid, pad=width - lengths,
                   rows=torch.arange(len(prompts)), budgets=budgets, prompt_width=width,
                   outputs=[dict(token_ids=[], logprobs=[], sampling_logprobs=[],
                                 exit_loops=[], finish_reason=None) for _ in prompts])

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_slots(self) -> int:
        """Slots ever fed to the model: the last sampled token is never fed back."""
        return self.tokens.shape[1] - 1

    @property
    def all_done(self) -> bool:
        return all(out["finish_reason"] is not None for out in self.outputs)

    def positions(self, start: int, end: int) -> torch.Tensor:
        slots = torch.arange(start, end).unsqueeze(0)
        return (slots - self.pad.unsqueeze(1)).clamp(min=0)

    def attention_mask(self, start: int, end: int) -> torch.Tensor | None:
        """megatron's bool mask [b, 1, end-start, end] (True = masked): causal + padding."""
        if bool(self.pad.eq(0).all()):
            # Nothing to hide: megatron's own causal mask (prefill) or no mask (decode).
            return None
        query_slots = torch.arange(start, end).unsqueeze(1)
        future = torch.arange(end).unsqueeze(0) > query_slots  # [q, k]
        padding = ~self.valid[:, :end]  # [b, k]
        return (future.unsqueeze(0) | padding.unsqueeze(1)).unsqueeze(1)

    def append(self, tokens: torch.Tensor, logprobs: torch.Tensor,
               sampling_logprobs: torch.Tensor, stop_ids: torch.Tensor,
               exit_loops: torch.Tensor) -> torch.Tensor:
        """Record one sampled token per active row (read out from loop ``exit_loops``);
        returns which rows just finished."""
        slot = self.prompt_width + len(self.outputs[int(self.rows[0])]["token_ids"])
        self.tokens[:, slot] = tokens
        self.budgets -= 1
        stopped = torch.isin(tokens, stop_ids)
        out_of_budget = self.budgets.le(0)
        for row, token, logprob, sampling_logprob, stop, full, loop in zip(
                self.rows.tolist(), tokens.tolist(), logprobs.tolist(),
                sampling_logprobs.tolist(), stopped.tolist(), out_of_budget.tolist(),
                exit_loops.tolist()):
            out = self.outputs[row]
            out["token_ids"].append(token)
            out["exit_loops"].append(loop)
            out["logprobs"].append(logprob)
            out["sampling_logprobs"].append(sampling_logprob)
            if stop or full:
                out["finish_reason"] = "stop" if stop else "length"
        return stopped | out_of_budget

    def keep_rows(self, keep: torch.Tensor) -> None:
        for name in ("tokens", "valid", "pad", "rows", "budgets"):
            setattr(self, name, getattr(self, name).index_select(0, keep))

    def results(self, num_loops: int) -> list[GenerationResult]:
        return [GenerationResult(token_ids=out["token_ids"], logprobs=out["logprobs"],
                                 sampling_logprobs=out["sampling_logprobs"],
                                 finish_reason=out["finish_reason"], num_loops=num_loops,
                                 exit_loops=out["exit_loops"])
                for out in self.outputs]


# ----- model plumbing -----

def _check_supported(model: torch.nn.Module) -> LoopGPTModel:
    if not isinstance(model, LoopGPTModel):
        raise TypeError(f"NativeLoopEngine needs a LoopGPTModel, got {type(model).__name__}")
    if parallel_state.model_parallel_is_initialized() and \
            parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError(
            "NativeLoopEngine does not support pipeline parallelism (pipeline parallel size "
            f"{parallel_state.get_pipeline_model_parallel_world_size()}); generate with PP=1 "
            "(tensor parallelism is supported)")
    if not (model.pre_process and model.post_process):
        raise NotImplementedError("NativeLoopEngine needs the whole model on this rank (PP=1)")
    if model.config.sequence_parallel:
        raise NotImplementedError("NativeLoopEngine does not support sequence parallelism: a "
                                  "decode step has one token per row, which cannot be split "
                                  "over TP ranks; build the model with sequence_parallel=False")
    return model


@contextlib.contextmanager
def _inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """eval() + no_grad for the call, restoring the trainer's mode afterwards (shared module)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _copy_parameters(model: torch.nn.Module,
                     source: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    targets = dict(model.named_parameters())
    missing = sorted(set(targets) - set(source))
    if missing:
        raise KeyError(f"refit source lacks {len(missing)} parameters, e.g. {missing[:3]}")
    copied = 0
    for name, target in targets.items():
        tensor = source[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"refit shape mismatch for {name}: engine {tuple(target.shape)}, "
                             f"source {tuple(tensor.shape)} (same TP layout required)")
        target.data.copy_(tensor.detach())  # casts when the engine keeps another dtype
        copied += target.numel() * target.element_size()
    return copied, len(targets)


def _as_int_lists(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        return prompts.tolist()
    if not isinstance(prompts, (list, tuple)):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    return [p.tolist() if isinstance(p, torch.Tensor) else p for p in prompts]


def _tp_broadcast(tensor: torch.Tensor) -> torch.Tensor:
    if not parallel_state.model_parallel_is_initialized() or \
            parallel_state.get_tensor_model_parallel_world_size() == 1:
        return tensor
    torch.distributed.broadcast(tensor, src=parallel_state.get_tensor_model_parallel_src_rank(),
                                group=parallel_state.get_tensor_model_parallel_group())
    return tensor


def _same_on_all_tp_ranks(tokens: torch.Tensor) -> torch.Tensor:
    # Every rank samples the same gathered logits with the same generator, so this only guards
    # against a rank drifting; it costs one tiny broadcast per step.
    return _tp_broadcast(tokens.contiguous())


def _shared_seed(seed: int | None) -> int:
    if seed is not None:
        return seed
    # From the OS, not torch's global generator, so generating never shifts the trainer's RNG.
    drawn = torch.tensor([int.from_bytes(os.urandom(8), "little") >> 2], dtype=torch.long)
    return int(_tp_broadcast(drawn).item())
