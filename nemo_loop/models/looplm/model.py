"""LoopGPTModel: Ouro's looped transformer built from megatron-core parts.

A vocab-parallel embedding feeds a block of L shared layers that runs R times. After every
loop the final RMSNorm is applied; its output is both the next loop's input and that loop's
*readout*. One vocab-parallel output layer, shared by all loops (the loop-dimension head), maps
the readouts a caller asks for to logits ``[n_loops, seq, batch, vocab/TP]``; loops nobody asked
for never reach the head. An early-exit gate ``Linear(hidden, 1)`` on every readout gives the
per-loop exit distribution.

Under pipeline parallelism each stage holds a contiguous slice of the shared layers (the first
stage also the embedding, the last stage also the final norm, head and gate); a loop is one trip
through all stages, and ``nemo_loop.models.looplm.pipeline`` sends the hidden state from the
last stage back to the first for the next loop. ``forward`` is the single-stage path.

Running loops and reading them out has one home, used by training, generation and evaluation:
``run_loops`` (embed + R̃ loops, yielding each loop's readout), ``run_loop`` (one loop on any
rows, for a caller that schedules loops itself: adaptive exit), ``logits`` (the head, tied or
not), ``output_weight`` (the head's weight, for fused losses), ``exit_logits`` (the gate),
``key_value_projection`` (the keys/values each layer would attend with from a readout) and
``loop_output`` (all of it as a ``LoopOutput``). A caller may replace each loop's readout with
a per-loop ``readout_transform`` (``finish_loop``; LoopRPT's noisy latent rollouts), which the
head, the gate and the next loop then all see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.transformer_block import TransformerBlock

from nemo_loop.models.looplm.config import LoopTransformerConfig
from nemo_loop.models.looplm.layer_specs import loop_block_spec


# (readout [s(/TP with SP), b, h], 1-based loop) → the readout the head, the exit gate and the
# next loop see instead.
ReadoutTransform = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class LoopOutput:
    """What the last pipeline stage produces for one micro-batch.

    ``loops`` are 1-based loop ids of ``readouts``/``logits`` (the loops asked for);
    ``exit_logits`` covers every loop that ran.
    """

    loops: list[int]
    readouts: torch.Tensor  # [n, s(/TP with SP), b, h]
    logits: torch.Tensor | None  # [n, s, b, vocab/TP]
    exit_logits: torch.Tensor  # [num_loops, s, b]

    @property
    def exit_probs(self) -> torch.Tensor:
        return exit_distribution(self.exit_logits)


def exit_distribution(exit_logits: torch.Tensor) -> torch.Tensor:
    """p_r = σ(g_r)·∏_{j<r}(1−σ(g_j)) for r < n; the last loop takes the remaining mass."""
    return exit_log_distribution(exit_logits).exp()


def exit_log_distribution(exit_logits: torch.Tensor) -> torch.Tensor:
    """log p_r of :func:`exit_distribution` (fp32), computed in log space so that long runs of
    confident "continue" gates stay exact and log p_r stays finite (policy gradients on the exit
    decision need it)."""
    num_loops = exit_logits.shape[0]
    log_exit = torch.nn.functional.logsigmoid(exit_logits.float())
    log_continue = torch.nn.functional.logsigmoid(-exit_logits.float())
    log_survive = torch.cumsum(log_continue, dim=0) - log_continue  # ∏_{j<r}
    log_p = log_exit + log_survive
    log_p[num_loops - 1] = log_survive[num_loops - 1]
    return log_p


def check_num_loops(num_loops: int, max_loops: int) -> int:
    if not isinstance(num_loops, int) or not 1 <= num_loops <= max_loops:
        raise ValueError(f"num_loops must be an integer in [1, {max_loops}] (the model's R), "
                         f"got {num_loops!r}")
    return num_loops


def check_logit_loops(logit_loops, num_loops: int) -> list[int]:
    loops = list(range(1, num_loops + 1)) if logit_loops is None else list(logit_loops)
    if any(not 1 <= r <= num_loops for r in loops) or loops != sorted(set(loops)):
        raise ValueError(f"logit_loops must be increasing loop ids in [1, {num_loops}], "
                         f"got {logit_loops!r}")
    return loops


class LoopGPTModel(LanguageModule):
    """One pipeline stage of a looped GPT (the whole model when PP=1)."""

    def __init__(self, config: LoopTransformerConfig, pre_process: bool = True,
                 post_process: bool = True):
        super().__init__(config=config)
        self.config: LoopTransformerConfig = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        self.vocab_size = config.vocab_size
        self.max_sequence_length = config.max_sequence_length
        self.position_embedding_type = "rope"

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config, vocab_size=config.vocab_size,
                max_sequence_length=config.max_sequence_length, position_embedding_type="rope")
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=config.rotary_base,
            use_cpu_initialization=config.use_cpu_initialization)
        # Every stage receives its input explicitly, so the block never reads set_input_tensor.
        self.decoder = TransformerBlock(config=config,
                                        spec=loop_block_spec(config),
                                        pre_process=True, post_process=post_process)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, config.vocab_size, config=config,
                init_method=config.init_method, bias=False, skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=pre_process
                and self.share_embeddings_and_output_weights)
            self.exit_gate = torch.nn.Linear(config.hidden_size, 1, dtype=config.params_dtype)
            for param in self.exit_gate.parameters():
                # Replicated across TP; with SP each rank sees a sequence shard, so its grads
                # are summed over TP in finalize_model_grads like the layernorm weights.
                setattr(param, "sequence_parallel", config.sequence_parallel)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    @property
    def num_loops(self) -> int:
        return self.config.num_loops

    def set_input_tensor(self, input_tensor) -> None:
        """Unused: the loop pipeline passes every stage's input explicitly."""

    # ----- stage pieces, shared by ``run_loops`` and the loop pipeline -----

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        """[b, s] token ids → [s(/TP with SP), b, h] (first stage only)."""
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        return self.embedding(input_ids=input_ids, position_ids=position_ids)

    def rotary_embedding(self, seq_len: int) -> torch.Tensor:
        return self.rotary_pos_emb(seq_len)

    def run_shared_layers(self, hidden: torch.Tensor, attention_mask=None, rotary_pos_emb=None,
                          inference_context=None) -> torch.Tensor:
        """One pass of this stage's slice of the shared layers (+ final norm on the last stage)."""
        return self.decoder(hidden_states=hidden, attention_mask=attention_mask,
                            rotary_pos_emb=rotary_pos_emb, inference_context=inference_context)

    # ----- the loop / read-out API: every caller runs loops and reads out through these -----

    def run_loops(self, input_ids: torch.Tensor, num_loops: int | None = None, *,
                  position_ids: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None,
                  rotary_pos_emb: torch.Tensor | None = None,
                  inference_context_for: Callable[[int], object] | None = None,
                  readout_transform: ReadoutTransform | None = None,
                  ) -> Iterator[torch.Tensor]:
        """Embed ``input_ids`` [b, s] and run ``num_loops`` loops (R̃ ≤ R, default R) of the
        whole model (PP=1), yielding each loop's readout [s(/TP with SP), b, h] in loop order.

        A readout is the final-norm output of a loop, i.e. also the next loop's input. Loops
        run as the caller iterates, so one that keeps only the last readout holds one loop's
        activations at a time. ``rotary_pos_emb`` defaults to the table of the input's own
        positions; with a KV cache pass the cache's table. ``inference_context_for(loop)``
        (0-based) gives the KV cache context of a loop and is called right before it runs.
        ``readout_transform(readout, loop)`` (1-based loop), if given, replaces each loop's
        final-norm output before it is read out and fed to the next loop (see
        :meth:`finish_loop`).
        """
        if not (self.pre_process and self.post_process):
            raise RuntimeError("LoopGPTModel.run_loops/forward run a whole model; with pipeline "
                               "parallelism use nemo_loop.models.looplm.pipeline")
        num_loops = check_num_loops(self.num_loops if num_loops is None else num_loops,
                                    self.num_loops)
        hidden = self.embed(input_ids, position_ids)
        if rotary_pos_emb is None:
            rotary_pos_emb = self.rotary_embedding(_full_seq_len(hidden, self.config))
        return self._loops(hidden, num_loops, attention_mask, rotary_pos_emb,
                           inference_context_for, readout_transform)

    def _loops(self, hidden, num_loops, attention_mask, rotary_pos_emb, inference_context_for,
               readout_transform):
        for loop in range(num_loops):
            context = inference_context_for(loop) if inference_context_for is not None else None
            hidden = self.run_loop(hidden, loop + 1, attention_mask=attention_mask,
                                   rotary_pos_emb=rotary_pos_emb, inference_context=context,
                                   readout_transform=readout_transform)
            yield hidden

    def run_loop(self, hidden: torch.Tensor, loop: int, *,
                 attention_mask: torch.Tensor | None = None,
                 rotary_pos_emb: torch.Tensor | None = None, inference_context=None,
                 readout_transform: ReadoutTransform | None = None) -> torch.Tensor:
        """Loop ``loop`` (1-based) of the whole model (PP=1) on ``hidden`` [s, b, h] (the
        previous loop's readout, or the embedding before loop 1): its readout [s, b, h].

        The rows of ``hidden`` may be any subset of a batch (adaptive exit runs each loop on the
        rows still looping); ``attention_mask``, ``rotary_pos_emb`` and the KV cache are then
        those of the same rows, as in :meth:`run_loops`."""
        hidden = self.run_shared_layers(hidden, attention_mask, rotary_pos_emb,
                                        inference_context)
        return self.finish_loop(hidden, loop, readout_transform)

    @staticmethod
    def finish_loop(readout: torch.Tensor, loop: int,
                    readout_transform: ReadoutTransform | None) -> torch.Tensor:
        """A loop's readout (the last stage's final-norm output) after the caller's optional
        per-loop transform, e.g. LoopRPT's latent noise: the transformed tensor is what the head
        and exit gate read *and* what the next loop receives, on every path that runs loops
        (``run_loops`` and the loop pipeline)."""
        return readout if readout_transform is None else readout_transform(readout, loop)

    def output_weight(self) -> torch.Tensor:
        """The head's weight [V/TP, h]: the word embedding's when tied, else the output layer's."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def logits(self, readouts: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Head logits [n, s, b, V/TP] of readouts [n, s(/TP with SP), b, h] (a tensor or a
        sequence of n [s(/TP), b, h] tensors); under sequence parallelism the head gathers the
        sequence."""
        weight = self.output_weight()
        # One call per loop: under sequence parallelism the layer gathers along dim 0, which
        # must be the sequence of a single loop.
        return torch.stack([self.output_layer(readout, weight=weight)[0]
                            for readout in readouts])

    def exit_logits(self, readouts: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Exit-gate logits [n, s, b] of readouts [n, s(/TP with SP), b, h], full sequence."""
        gate = torch.stack([self.exit_gate(readout).squeeze(-1) for readout in readouts])
        if self.config.sequence_parallel:
            gate = tensor_parallel.gather_from_sequence_parallel_region(
                gate.transpose(0, 1)).transpose(0, 1)
        return gate

    def key_value_projection(self, readout: torch.Tensor, rotary_pos_emb: torch.Tensor
                             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per shared layer, the (key, value) [s, b, groups/TP, head_dim] that layer computes
        from ``readout`` [s, b, h] as its input: input norm, the K/V rows of the QKV projection
        and RoPE of ``rotary_pos_emb`` (the table rows of the positions) on the key. Q,
        attention and MLP are skipped. Adaptive exit's ``propagate`` fill: a token that stopped
        after loop r gets, in every deeper loop, the keys/values of its loop-r readout (CALM's
        state propagation; exact for loop r+1's first layer, whose input that readout is)."""
        return [key_value_of_layer(layer, readout, rotary_pos_emb)
                for layer in self.decoder.layers]

    def loop_output(self, readouts: Sequence[torch.Tensor], logit_loops: list[int],
                    compute_logits: bool = True) -> LoopOutput:
        """``LoopOutput`` of every loop's readout [s(/TP), b, h]: exit-gate logits of all of
        them, readouts and (unless ``compute_logits=False``) head logits of ``logit_loops``."""
        chosen = torch.stack([readouts[r - 1] for r in logit_loops])
        return LoopOutput(loops=list(logit_loops), readouts=chosen,
                          logits=self.logits(chosen) if compute_logits else None,
                          exit_logits=self.exit_logits(readouts))

    # ----- single-stage forward -----

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, num_loops: int | None = None,
                logit_loops=None, compute_logits: bool = True,
                inference_contexts=None,
                readout_transform: ReadoutTransform | None = None) -> LoopOutput:
        """Run ``num_loops`` (R̃ ≤ R) loops; ``inference_contexts`` holds one KV cache per loop;
        ``readout_transform`` as in :meth:`run_loops`."""
        num_loops = check_num_loops(self.num_loops if num_loops is None else num_loops,
                                    self.num_loops)
        logit_loops = check_logit_loops(logit_loops, num_loops)
        rotary = None
        if inference_contexts is not None and inference_contexts[0] is not None:
            rotary = self.rotary_embedding(inference_contexts[0].max_sequence_length)
        readouts = list(self.run_loops(
            input_ids, num_loops, position_ids=position_ids, attention_mask=attention_mask,
            rotary_pos_emb=rotary,
            inference_context_for=None if inference_contexts is None
            else inference_contexts.__getitem__, readout_transform=readout_transform))
        return self.loop_output(readouts, logit_loops, compute_logits)


def key_value_of_layer(layer, hidden: torch.Tensor, rotary_pos_emb: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(key after RoPE, value) of one megatron TransformerLayer for input ``hidden`` [s, b, h],
    as its self-attention computes them."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer.identity_op import IdentityOp

    attention = layer.self_attention
    fused_norm = isinstance(layer.input_layernorm, IdentityOp)  # TE: norm inside linear_qkv
    groups = attention.num_query_groups_per_partition
    if fused_norm or attention.config.num_query_groups < attention.world_size:
        # megatron's own split (it also projects the queries): the fused-norm (TE) and
        # groups < TP layouts, whose K/V rows are not a plain slice of this rank's weight.
        _, key, value = attention.get_query_key_value_tensors(layer.input_layernorm(hidden))[:3]
    else:
        # linear_qkv's rows are [q heads of group g, k of g, v of g] per local group g.
        head_dim = attention.hidden_size_per_attention_head
        per_group = attention.num_attention_heads_per_partition // groups + 2
        weight = attention.linear_qkv.weight.view(groups, per_group, head_dim, -1)[:, -2:]
        bias = attention.linear_qkv.bias
        if bias is not None:
            bias = bias.view(groups, per_group, head_dim)[:, -2:].reshape(-1)
        key_value = torch.nn.functional.linear(layer.input_layernorm(hidden),
                                               weight.reshape(-1, weight.shape[-1]), bias)
        key, value = key_value.view(*hidden.shape[:2], groups, 2, head_dim).unbind(3)
    key = apply_rotary_pos_emb(key.contiguous(), rotary_pos_emb, config=attention.config,
                               mscale=getattr(attention, "_yarn_concentration_factor", 1.0),
                               cp_group=attention.pg_collection.cp)
    return key, value.contiguous()


def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(
        input_ids)


def _full_seq_len(hidden, config) -> int:
    seq = hidden.shape[0]
    return seq * config.tensor_model_parallel_size if config.sequence_parallel else seq


def build_loop_model(config: LoopTransformerConfig) -> LoopGPTModel:
    """The stage of the model this rank holds under the current parallel_state (its core
    attention and recompute as ``config`` says: ``model.attention_backend``, ``model.recompute``)."""
    from megatron.core import parallel_state

    return LoopGPTModel(config, pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage())
