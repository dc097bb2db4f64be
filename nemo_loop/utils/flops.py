"""Model FLOPs of a LoopLM: forward passes, training, generation and one inference token.

Conventions (those of the Megatron/PaLM MFU accounting):

* a multiply-add is 2 FLOPs and only matrix products count: the QKV, output, and SwiGLU
  projections of every layer, attention's QKᵀ and A·V, the output head and the exit gate.
  Norms, activations, softmax, RoPE, residual adds and the embedding lookup are O(h) per token
  and left out;
* attention is causal and counted exactly: a query with ``k`` keys before it attends to ``k + 1``
  keys, and each (query, key) pair costs 2·d_head per head for QKᵀ and as much for A·V;
* one loop is one pass through the L shared layers plus the exit gate (``Linear(h, 1)``) on its
  readout; the head (``h × V``) runs only on the (position, loop) readouts an algorithm reads;
* backward = 2 × forward (gradients of activations and of weights), so a trained pass costs
  3 × its forward; recomputation is not model FLOPs;
* padding is not counted: these are the model FLOPs of the real tokens, so a step's count does
  not depend on how rows are batched, and MFU = model FLOPs / (seconds × devices × peak).

Pure arithmetic on a model config's sizes (anything with ``hidden_size``, ``num_layers``,
``num_attention_heads``, ``num_query_groups``, ``ffn_hidden_size``, ``vocab_size`` and
``num_loops``, e.g. :class:`~nemo_loop.models.looplm.config.LoopModelConfig`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Dense bf16 peak of one H100 SXM (989.4 TFLOP/s without sparsity), a common `peak_flops_per_s`.
H100_BF16_DENSE_FLOPS = 989.4e12
TRAINING_MULTIPLIER = 3  # forward + backward (2 × forward)


@dataclass(frozen=True)
class LoopShape:
    hidden: int
    layers: int
    heads: int
    query_groups: int
    ffn: int
    vocab: int
    num_loops: int

    @classmethod
    def of(cls, model_config) -> LoopShape:
        return cls(hidden=model_config.hidden_size, layers=model_config.num_layers,
                   heads=model_config.num_attention_heads,
                   query_groups=model_config.num_query_groups or model_config.num_attention_heads,
                   ffn=model_config.ffn_hidden_size, vocab=model_config.vocab_size,
                   num_loops=model_config.num_loops)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_flops_per_token(self) -> int:
        """The projections of one layer for one token: Q, K, V (grouped-query: K and V have
        ``query_groups`` heads), the attention output, SwiGLU's gate, up and down."""
        query = self.heads * self.head_dim
        key_value = 2 * self.query_groups * self.head_dim
        qkv = 2 * self.hidden * (query + key_value)
        output = 2 * query * self.hidden
        mlp = 3 * 2 * self.hidden * self.ffn
        return qkv + output + mlp

    def attention_flops_per_pair(self) -> int:
        """QKᵀ and A·V for one (query, key) pair in one layer, all heads."""
        return 2 * 2 * self.heads * self.head_dim

    def gate_flops(self) -> int:
        return 2 * self.hidden

    def head_flops(self) -> int:
        return 2 * self.hidden * self.vocab


def causal_pairs(new_tokens: int, past_tokens: int = 0) -> int:
    """(query, key) pairs when ``new_tokens`` queries follow ``past_tokens`` cached keys."""
    return new_tokens * past_tokens + new_tokens * (new_tokens + 1) // 2


def forward_flops(shape: LoopShape, new_tokens: int, loops: int, readouts: int = 0,
                  past_tokens: int = 0) -> int:
    """One forward of ``new_tokens`` tokens of one sequence through ``loops`` loops, after
    ``past_tokens`` cached ones, with the head on ``readouts`` (position, loop) readouts."""
    if min(new_tokens, loops, readouts, past_tokens) < 0:
        raise ValueError(f"token, loop and readout counts must be >= 0, got new_tokens="
                         f"{new_tokens}, loops={loops}, readouts={readouts}, past_tokens="
                         f"{past_tokens}")
    per_loop = (shape.layers * (new_tokens * shape.layer_flops_per_token()
                                + causal_pairs(new_tokens, past_tokens)
                                * shape.attention_flops_per_pair())
                + new_tokens * shape.gate_flops())
    return loops * per_loop + readouts * shape.head_flops()


def training_flops(shape: LoopShape, tokens: int, loops: int, readouts: int) -> int:
    """Forward and backward of one sequence of ``tokens`` tokens."""
    return TRAINING_MULTIPLIER * forward_flops(shape, tokens, loops, readouts)


def generation_flops(shape: LoopShape, prompt_tokens: int, generated_tokens: int,
                     loops: int) -> int:
    """Sampling ``generated_tokens`` tokens after a prompt at ``loops`` loops with a KV cache:
    the prefill of the prompt and one decoding step per further token read the same causal
    pairs as one forward of prompt + generated − 1 tokens; the head runs once per generated
    token, on the last loop."""
    if generated_tokens < 1:
        return 0
    return forward_flops(shape, prompt_tokens + generated_tokens - 1, loops,
                         readouts=generated_tokens)


def adaptive_generation_flops(shape: LoopShape, prompt_tokens: int, num_loops: int,
                              loops_run: Sequence[int], head_readouts: Sequence[int],
                              propagated: Sequence[bool] = ()) -> int:
    """Sampling ``len(loops_run)`` tokens with a KV cache when each token may run its own
    number of loops (adaptive exit). Token 0 comes from the prefill, which runs all
    ``num_loops`` loops over the prompt (``loops_run[0]`` is ignored); token t ≥ 1 from a decode
    step running ``loops_run[t]`` loops over ``prompt_tokens + t − 1`` cached tokens. The head
    runs ``head_readouts[t]`` times for token t (1, or once per loop a policy reads), and a
    ``propagated[t]`` token pays one K/V projection per layer for the loops it skipped (the
    same keys/values fill all of them)."""
    if not loops_run:
        return 0
    total = forward_flops(shape, prompt_tokens, num_loops, readouts=head_readouts[0])
    for t in range(1, len(loops_run)):
        total += forward_flops(shape, 1, loops_run[t], readouts=head_readouts[t],
                               past_tokens=prompt_tokens + t - 1)
    key_value = 2 * shape.hidden * 2 * shape.query_groups * shape.head_dim
    return total + sum(propagated) * shape.layers * key_value


def inference_flops_per_token(shape: LoopShape, loops: int, context_tokens: int) -> int:
    """One decoding step at ``loops`` loops with ``context_tokens`` tokens already cached."""
    return forward_flops(shape, 1, loops, readouts=1, past_tokens=context_tokens)


def throughput(flops: float, seconds: float, devices: int,
               peak_flops_per_s: float | None) -> dict:
    """Achieved model FLOP/s per device and, given the device's peak, the MFU."""
    per_device = flops / (seconds * devices) if seconds > 0 and devices > 0 else float("nan")
    metrics = {"achieved_flops_per_s_per_device": per_device}
    if peak_flops_per_s:
        metrics["mfu"] = per_device / peak_flops_per_s
    return metrics
