"""What a LoopLM stage holds on a device: parameters per rank, and the activations autograd keeps
for backward per loop, per attention backend and recompute setting. Pure arithmetic on a
:class:`~nemo_loop.models.looplm.config.LoopModelConfig` (the memory planner,
``nemo_loop.algorithms.memory_plan``, adds the optimizer, the losses and the rollouts).

Saved tensors of one layer application, per token, counted from what megatron-core's local layer
and torch's autograd keep (checked against saved-tensor hooks in tests/unit/test_memory_plan.py),
with e = bytes of the activation dtype (the params dtype), h hidden, f SwiGLU width, n heads, g
query groups, d head size, s sequence:

* norms (replicated over TP unless sequence parallel): each RMSNorm keeps its input and its
  normalized output; the input norm's and the pre-MLP norm's outputs are also the inputs the QKV
  and fc1 projections keep: 10·h for the sandwich layer (4 norms), 6·h pre-norm, plus one fp32
  1/rms per norm and token;
* attention (split over TP): the rotated query (n·d), the context (n·d, the output projection's
  input), keys and values: 2·n·d when the groups are repeated per head (DotProductAttention
  always; SDPA with a mask, see ``attention.py``), else the rotated key (g·d) and the QKV
  projection's output ((n + 2g)·d, which the value is a view of); then per backend SDPA/TE's fp32
  log-sum-exp (n), or DotProductAttention's probabilities ([b, n, s, s]: n·s per token);
* MLP (split over TP): fc1's output (2·f), SiLU's output, the gated product and fc2's input (3·f);
* RoPE: cos and sin for queries and keys, 4·s·d per layer call whatever the batch (and
  DotProductAttention without a mask: megatron's bool causal mask, s² bytes per call);
* per loop, on the last stage, the final norm: 2·h + one fp32 per token.

Recompute: ``full`` keeps each checkpointed chunk's input (h per token) and rebuilds one chunk's
activations inside backward; ``selective`` drops what the recomputed modules keep (core_attn:
the log-sum-exp or the probabilities; mlp: the MLP's 5·f).
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4


@dataclass(frozen=True)
class StageShape:
    """A LoopLM stage under a layout: which parts it holds and how its tensors are split."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    first: bool = True  # holds the embedding
    last: bool = True  # holds the final norm, head and exit gate

    @classmethod
    def stages(cls, tensor_parallel: int, pipeline_parallel: int,
               sequence_parallel: bool = False) -> list[StageShape]:
        """The distinct stages: one when PP = 1, else the first and the last."""
        if pipeline_parallel == 1:
            return [cls(tensor_parallel, 1, sequence_parallel)]
        return [cls(tensor_parallel, pipeline_parallel, sequence_parallel, True, False),
                cls(tensor_parallel, pipeline_parallel, sequence_parallel, False, True)]

    @property
    def name(self) -> str:
        if self.pipeline_parallel == 1:
            return "the model"
        return "first stage" if self.first else "last stage"


def layer_parameters(config) -> tuple[int, int]:
    """(parameters split over TP, replicated norm weights) of one shared layer."""
    h, n = config.hidden_size, config.num_attention_heads
    g, d = config.num_query_groups or n, config.hidden_size // n
    split = h * d * (n + 2 * g) + n * d * h + 3 * h * config.ffn_hidden_size
    norms = (4 if config.layer_spec == "sandwich" else 2) * h
    return split, norms


def stage_parameters(config, stage: StageShape) -> int:
    """Parameters this rank holds (its TP shard of its pipeline stage)."""
    split, norms = layer_parameters(config)
    layers = config.num_layers // stage.pipeline_parallel
    count = layers * (split // stage.tensor_parallel + norms)
    vocab_rows = config.vocab_size // stage.tensor_parallel
    if stage.first:
        count += vocab_rows * config.hidden_size
    if stage.last:
        if not (config.tie_word_embeddings and stage.first):
            count += vocab_rows * config.hidden_size
        count += config.hidden_size + config.hidden_size + 1  # final norm, exit gate
    return count


def repeats_groups(config, core_attention: str, masked: bool) -> bool:
    groups = config.num_query_groups or config.num_attention_heads
    return groups != config.num_attention_heads and (core_attention == "dot_product" or masked)


def recomputed_modules(config) -> tuple[str, ...]:
    """The modules ``recompute: selective`` checkpoints (megatron's default: core_attn)."""
    if config.recompute != "selective":
        return ()
    return tuple(config.recompute_modules or ("core_attn",))


def layer_activation_bytes(config, seq: int, rows: int, stage: StageShape, core_attention: str,
                           masked: bool, activation_bytes: int,
                           recomputed_modules: tuple[str, ...] = ()) -> int:
    """Saved-for-backward bytes of one layer application to ``rows`` sequences of ``seq``
    tokens on this rank (see the module docstring)."""
    e, tp = activation_bytes, stage.tensor_parallel
    h, f, n = config.hidden_size, config.ffn_hidden_size, config.num_attention_heads
    g, d = config.num_query_groups or n, h // n
    tokens = seq * rows
    norm_count = 4 if config.layer_spec == "sandwich" else 2
    norm_split = tp if stage.sequence_parallel else 1
    norms = tokens * ((2 * norm_count + 2) * h * e + norm_count * FP32) // norm_split
    if repeats_groups(config, core_attention, masked) and "core_attn" not in recomputed_modules:
        keys_values = 2 * n * d  # (a recomputed core attention keeps its unrepeated inputs)
    else:
        keys_values = g * d + (n + 2 * g) * d
    attention = tokens * (2 * n * d + keys_values) * e // tp
    if "core_attn" not in recomputed_modules:
        if core_attention == "dot_product":
            attention += tokens * n * seq * e // tp
        else:
            attention += tokens * n * FP32 // tp
    mlp = 0 if "mlp" in recomputed_modules else tokens * 5 * f * e // tp
    rope = 4 * seq * d * e
    # DotProductAttention without a mask builds megatron's bool causal mask in every call.
    causal_mask = seq * seq if core_attention == "dot_product" and not masked else 0
    return norms + attention + mlp + rope + causal_mask


def final_norm_bytes(config, seq: int, rows: int, stage: StageShape, activation_bytes: int
                     ) -> int:
    if not stage.last:
        return 0
    split = stage.tensor_parallel if stage.sequence_parallel else 1
    return seq * rows * (2 * config.hidden_size * activation_bytes + FP32) // split


@dataclass(frozen=True)
class LoopActivations:
    """Bytes per loop of one micro-batch on a stage, and the transient working set a backward
    (recompute) or an attention kernel needs on top."""

    per_loop: int
    working_set: int
    note: str


def loop_activations(config, seq: int, rows: int, stage: StageShape, core_attention: str,
                     masked: bool, activation_bytes: int) -> LoopActivations:
    """One loop's pass of one micro-batch through this stage's layers, under
    ``config.recompute``."""
    layers = config.num_layers // stage.pipeline_parallel
    args = (config, seq, rows, stage, core_attention, masked, activation_bytes)
    final = final_norm_bytes(config, seq, rows, stage, activation_bytes)
    scores = _score_tensor_bytes(config, seq, rows, stage, activation_bytes) \
        if core_attention == "dot_product" else 0
    if config.recompute == "full":
        split = stage.tensor_parallel if stage.sequence_parallel else 1
        # each checkpoint keeps its hidden-state input, and the micro-batch's RoPE table
        checkpoint_input = seq * rows * config.hidden_size * activation_bytes // split
        final += seq * (config.hidden_size // config.num_attention_heads) * FP32
        full_layer = layer_activation_bytes(*args)
        if (config.recompute_method or "uniform") == "uniform":
            chunk = config.recompute_num_layers or 1
            chunks = -(-layers // chunk)
            return LoopActivations(chunks * checkpoint_input + final,
                                   chunk * full_layer + 2 * scores,
                                   f"full recompute: {chunks} chunk input(s) of {chunk} layer(s)")
        block = config.recompute_num_layers or layers
        return LoopActivations(block * checkpoint_input + (layers - block) * full_layer + final,
                               full_layer + 2 * scores,
                               f"full recompute of the first {block} layer(s)")
    modules = recomputed_modules(config)
    layer = layer_activation_bytes(*args, recomputed_modules=modules)
    recomputed = 0
    if modules:
        recomputed = layer_activation_bytes(*args) - layer
    return LoopActivations(layers * layer + final, recomputed + 2 * scores,
                           f"{layers} layer(s) × {_mib(layer)} per loop"
                           + (f", recomputing {'+'.join(modules)}" if modules else ""))


def _score_tensor_bytes(config, seq: int, rows: int, stage: StageShape, e: int) -> int:
    """One [b, n/TP, s, s] tensor: DotProductAttention's scores, probabilities and their grads."""
    return rows * config.num_attention_heads // stage.tensor_parallel * seq * seq * e


def attention_buffers(config, seq: int, rows: int, stage: StageShape, core_attention: str,
                      masked: bool, activation_bytes: int) -> int:
    """Per micro-batch tensors every layer and loop share: SDPA's additive mask (one per mask
    and dtype; made inside the checkpoints, and not kept, when every attention is recomputed),
    DotProductAttention's global score buffer (megatron's ``mpu`` buffer)."""
    if core_attention == "dot_product":
        return _score_tensor_bytes(config, seq, rows, stage, activation_bytes)
    inside_checkpoints = "core_attn" in recomputed_modules(config) or (
        config.recompute == "full" and (config.recompute_method or "uniform") == "uniform")
    if core_attention == "sdpa" and masked and not inside_checkpoints:
        return rows * seq * seq * activation_bytes
    return 0


def _mib(value: int) -> str:
    return f"{value / 2**20:,.1f} MiB"
