"""``OuroForCausalLM`` for vLLM: the LoopLM written against vLLM's model API.

Same computation as ``LoopGPTModel`` with ``layer_spec: sandwich`` (and as HF Ouro): embed, then
R̃ times [L shared sandwich layers, final RMSNorm], where the normalized state is both the next
loop's input and the loop's readout; the head reads the final loop, or, with an adaptive exit
policy (``set_exit``), each request's exit loop at its sampled position. Per layer:
x ← x + N₂(Attn(N₁x)); x ← x + N₄(MLP(N₃x)).

Adaptive exit here is readout selection (``kv_fill: compute``): vLLM's scheduler runs every
request through every loop, so the loops a token skips still run for their keys/values and no
compute is saved. The sampled positions are the last token of each request in the step (vLLM's
``logits_indices`` without speculative decoding), read from the attention metadata's
``query_start_loc``; the policy (``nemo_loop.generation.exit``) sees their readouts of every
loop, the gate ``early_exit_gate`` and, for ``confidence``/``oracle``, the full-vocabulary
logits of each loop. The exit loop of every sampled row is kept for the sampler
(``worker.TwoLogprobSampler``), which returns it with the token.

KV cache: the shared layers see different inputs in every loop, so each (loop, layer) pair needs
its own cache. Every layer owns one vLLM ``Attention`` per loop, registered under the virtual
layer index ``loop · L + layer`` (vLLM allocates, binds and orders caches by the single integer
in a layer name), so vLLM allocates R·L caches that share one block table. The loop budget
R̃ ≤ R is an attribute changed between calls (``set_num_loops``); loops above R̃ are not run and
their caches not written, which is why a call with more loops than the last ones must not reuse
prefix-cached blocks (the engine resets the prefix cache then).

Tensor parallelism uses vLLM's parallel layers (vocab-parallel embedding and head, QKV/merged
column-parallel and row-parallel linears); pipeline parallelism inside vLLM is refused, because
one loop would be one trip around all stages, which vLLM's pipeline cannot express.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

# HF projection → (vLLM fused parameter, shard id for its weight_loader).
_FUSED_PROJECTIONS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def attention_prefix(model_prefix: str, loop: int, layer: int, num_layers: int) -> str:
    """The cache name of (loop, layer): a virtual layer ``loop·L + layer`` with one integer."""
    return f"{model_prefix}.layers.{loop * num_layers + layer}.self_attn.attn"


class OuroAttention(nn.Module):
    """Grouped-query attention with RoPE; one vLLM ``Attention`` (KV cache) per loop."""

    def __init__(self, config, layer: int, vllm_config: VllmConfig, model_prefix: str,
                 prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        heads = config.num_attention_heads
        kv_heads = config.num_key_value_heads or heads
        _check_divisible(heads, kv_heads, tp_size)
        self.head_dim = config.hidden_size // heads
        self.num_heads = heads // tp_size
        self.num_kv_heads = max(1, kv_heads // tp_size)  # replicated when kv_heads < TP
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads,
                                          bias=False, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(heads * self.head_dim, config.hidden_size, bias=False,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   is_neox_style=True, rope_parameters=config.rope_parameters)
        self.attn = nn.ModuleList(
            Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5,
                      num_kv_heads=self.num_kv_heads, cache_config=vllm_config.cache_config,
                      prefix=attention_prefix(model_prefix, loop, layer,
                                              config.num_hidden_layers))
            for loop in range(config.total_ut_steps))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, loop: int) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn[loop](q, k, v))
        return output


class OuroMLP(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"Ouro MLP supports hidden_act='silu' only, got "
                             f"{config.hidden_act!r}")
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=False,
            prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                           bias=False, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(gate_up))
        return x


class OuroDecoderLayer(nn.Module):
    """Ouro's sandwich layer: four RMSNorms, names as in the HF checkpoint."""

    def __init__(self, config, layer: int, vllm_config: VllmConfig, model_prefix: str,
                 prefix: str):
        super().__init__()
        self.self_attn = OuroAttention(config, layer, vllm_config, model_prefix,
                                       f"{prefix}.self_attn")
        self.mlp = OuroMLP(config, f"{prefix}.mlp")
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps=eps)
        self.input_layernorm_2 = RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm_2 = RMSNorm(hidden, eps=eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, loop: int) -> torch.Tensor:
        attention = self.self_attn(positions, self.input_layernorm(hidden), loop)
        hidden = hidden + self.input_layernorm_2(attention)
        mlp = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + self.post_attention_layernorm_2(mlp)


class OuroModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model"):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.max_loops = config.total_ut_steps
        self.num_loops = self.max_loops
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            OuroDecoderLayer(config, i, vllm_config, prefix, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Evaluated by the q_exit policy (set_exit); loaded strictly in any case.
        self.early_exit_gate = ReplicatedLinear(config.hidden_size, 1, bias=True,
                                                prefix=f"{prefix}.early_exit_gate")
        self.exit = None  # an adaptive ExitConfig (None: static, the final loop is read out)
        self.full_logits = None  # readout [n, h] → [n, V] (set by OuroForCausalLM)
        self.exit_loops: torch.Tensor | None = None  # per sampled row of the last forward

    def set_num_loops(self, num_loops: int) -> None:
        if not isinstance(num_loops, int) or not 1 <= num_loops <= self.max_loops:
            raise ValueError(f"num_loops must be an integer in [1, {self.max_loops}] (the "
                             f"engine's total_ut_steps), got {num_loops!r}")
        self.num_loops = num_loops

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        sampled = _sampled_positions() if self.exit is not None else None
        readouts = []
        for loop in range(self.num_loops):
            for layer in self.layers:
                hidden = layer(positions, hidden, loop)
            hidden = self.norm(hidden)  # the loop's readout and the next loop's input
            if sampled is not None:
                readouts.append(hidden[sampled])
        self.exit_loops = None
        if sampled is not None:
            from nemo_loop.generation.exit import choose_exit_readouts

            chosen, self.exit_loops = choose_exit_readouts(
                self.exit, readouts, lambda r: self.early_exit_gate(r)[0].squeeze(-1),
                self.full_logits)
            hidden = hidden.index_put((sampled,), chosen)
        return hidden


class OuroForCausalLM(nn.Module):
    """vLLM text-generation model for Ouro checkpoints (``architectures: [OuroForCausalLM]``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        if get_pp_group().world_size > 1:
            raise NotImplementedError(
                "OuroForCausalLM does not support pipeline parallelism inside vLLM: a loop is "
                "one trip around all stages, which vLLM's pipeline cannot schedule; use "
                "tensor_parallel_size instead")
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = OuroModel(vllm_config=vllm_config, prefix=_join(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      prefix=_join(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def set_num_loops(self, num_loops: int) -> None:
        self.model.set_num_loops(num_loops)

    def set_exit(self, exit_config) -> None:
        """An adaptive ``ExitConfig`` for the following requests (None: static)."""
        self.model.exit = exit_config if exit_config is not None and exit_config.adaptive \
            else None
        self.model.full_logits = self._full_logits

    def _full_logits(self, readout: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [n, V] of readouts [n, h] on every TP rank."""
        from vllm.distributed import tensor_model_parallel_all_gather

        shard = self.lm_head.quant_method.apply(self.lm_head, readout)
        return tensor_model_parallel_all_gather(shard)[..., :self.config.vocab_size]

    @property
    def num_loops(self) -> int:
        return self.model.num_loops

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF Ouro tensors (``model.layers.0.self_attn.q_proj.weight`` …) through each
        parameter's vLLM weight loader, which fuses q/k/v and gate/up and keeps this TP rank's
        shard. Returns the names of the parameters written."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the head is the embedding
            module, _, kind = name.rpartition(".")
            parent, _, leaf = module.rpartition(".")
            if leaf in _FUSED_PROJECTIONS:
                fused, shard = _FUSED_PROJECTIONS[leaf]
                target = f"{parent}.{fused}.{kind}"
                _parameter(params, target, name).weight_loader(params[target], tensor, shard)
            else:
                target = name
                param = _parameter(params, target, name)
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded


def _sampled_positions() -> torch.Tensor | None:
    """The last token of every request in this step (what vLLM samples from), from the
    attention metadata; None outside a real step (profiling and dummy runs have none)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):
        metadata = metadata[0] if metadata else None
    if not metadata:
        return None
    query_start = next(iter(metadata.values())).query_start_loc
    return (query_start[1:] - 1).long()


def _parameter(params: dict[str, nn.Parameter], target: str, source: str) -> nn.Parameter:
    if target not in params:
        raise KeyError(f"Ouro checkpoint tensor {source!r} has no parameter in the vLLM model "
                       f"(looked for {target!r})")
    return params[target]


def _check_divisible(heads: int, kv_heads: int, tp_size: int) -> None:
    if heads % tp_size:
        raise ValueError(f"num_attention_heads {heads} is not divisible by "
                         f"tensor_parallel_size {tp_size}")
    if (kv_heads % tp_size) if kv_heads >= tp_size else (tp_size % kv_heads):
        raise ValueError(f"num_key_value_heads {kv_heads} and tensor_parallel_size {tp_size}: "
                         "one must divide the other")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
