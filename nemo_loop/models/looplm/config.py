"""Typed LoopLM configuration: the YAML schema and its megatron-core TransformerConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from nemo_loop.config import read_section
from nemo_loop.models.looplm.attention import ATTENTION_BACKENDS, resolve_attention_backend

LAYER_SPECS = ("sandwich", "prenorm")
RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
# megatron-core 0.19.2's selective modules that exist in a dense LoopLM layer (its others are
# MoE, MLA and gated-delta-net parts).
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")


@dataclass
class LoopTransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus the loop dimension.

    ``num_layers`` counts the *shared* layers L; the model applies them ``num_loops`` (R) times.
    """

    num_loops: int = 4
    layer_spec: str = "sandwich"
    core_attention: str = "sdpa"  # the resolved model.attention_backend: sdpa | dot_product | te
    vocab_size: int = 0
    max_sequence_length: int = 4096
    rotary_base: float = 10000.0
    share_embeddings_and_output_weights: bool = False


@dataclass
class LoopModelConfig:
    """What a user writes in ``conf/model/*.yaml``."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    vocab_size: int = 256
    max_sequence_length: int = 512
    num_loops: int = 4
    rope_theta: float = 10000.0
    layer_spec: str = "sandwich"
    norm_epsilon: float = 1e-6
    init_std: float = 0.02
    # None: init_std. Tiny models want O(1) embeddings: with 0.02 the token identity is a few
    # percent of a residual stream that every sandwich-normed sublayer adds unit RMS to.
    embedding_init_std: float | None = None
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    params_dtype: str = "float32"
    # Core attention: auto (Transformer Engine where it imports and a GPU is present, else sdpa)
    # | sdpa (torch's fused kernels) | dot_product (megatron's local [b, heads, s, s] reference)
    # | te. Changes speed and memory, not the function: checkpoints load across backends.
    attention_backend: str = "auto"
    # Activation recompute, megatron-core's recompute_* fields: none | selective (the
    # ``recompute_modules`` of every layer, megatron's default [core_attn]) | full (whole layers:
    # ``recompute_method`` uniform (default: chunks of ``recompute_num_layers`` layers, default 1)
    # or block (the first ``recompute_num_layers`` layers of each stage)). Applies to every loop.
    recompute: str = "none"
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    recompute_modules: list[str] | None = None
    name: str = "looplm"
    extra: dict = field(default_factory=dict)

    def validate(self, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
        problems = []
        if self.layer_spec not in LAYER_SPECS:
            problems.append(f"unknown layer_spec {self.layer_spec!r}; choose one of {LAYER_SPECS}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            problems.append(f"model.attention_backend must be one of {ATTENTION_BACKENDS}, got "
                            f"{self.attention_backend!r}")
        problems += self._recompute_problems(pipeline_parallel)
        if self.num_loops < 1:
            problems.append(f"num_loops must be >= 1, got {self.num_loops}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                            f"num_attention_heads {self.num_attention_heads}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                            f"num_query_groups {groups}")
        if self.num_attention_heads % tensor_parallel:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                            f"tensor_parallel {tensor_parallel}")
        if groups % tensor_parallel:
            problems.append(f"num_query_groups {groups} is not divisible by "
                            f"tensor_parallel {tensor_parallel}")
        if self.ffn_hidden_size % tensor_parallel:
            problems.append(f"ffn_hidden_size {self.ffn_hidden_size} is not divisible by "
                            f"tensor_parallel {tensor_parallel}")
        if self.vocab_size % tensor_parallel:
            problems.append(f"vocab_size {self.vocab_size} is not divisible by "
                            f"tensor_parallel {tensor_parallel}")
        if self.num_layers % pipeline_parallel:
            problems.append(f"num_layers {self.num_layers} is not divisible by "
                            f"pipeline_parallel {pipeline_parallel}")
        if self.tie_word_embeddings and pipeline_parallel > 1:
            problems.append("tie_word_embeddings is only supported with pipeline_parallel=1")
        if self.params_dtype not in _DTYPES:
            problems.append(f"unknown params_dtype {self.params_dtype!r}; choose one of "
                            f"{tuple(_DTYPES)}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def _recompute_problems(self, pipeline_parallel: int) -> list[str]:
        """What megatron would refuse (or silently ignore) in the recompute fields, by name."""
        if self.recompute not in RECOMPUTE:
            return [f"model.recompute must be one of {RECOMPUTE}, got {self.recompute!r}"]
        problems = []
        full, selective = self.recompute == "full", self.recompute == "selective"
        if self.recompute_method is not None and not full:
            problems.append(f"model.recompute_method applies to recompute=full only (recompute "
                            f"is {self.recompute!r})")
        elif self.recompute_method is not None and self.recompute_method not in RECOMPUTE_METHODS:
            problems.append(f"model.recompute_method must be one of {RECOMPUTE_METHODS}, got "
                            f"{self.recompute_method!r}")
        layers_per_stage = self.num_layers // max(pipeline_parallel, 1)
        if self.recompute_num_layers is not None:
            if not full:
                problems.append(f"model.recompute_num_layers applies to recompute=full only "
                                f"(recompute is {self.recompute!r})")
            elif not 1 <= self.recompute_num_layers <= layers_per_stage:
                problems.append(f"model.recompute_num_layers must be in [1, {layers_per_stage}] "
                                f"(the layers of one pipeline stage), got "
                                f"{self.recompute_num_layers}")
        if self.recompute_modules is not None:
            unknown = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
            if not selective:
                problems.append(f"model.recompute_modules applies to recompute=selective only "
                                f"(recompute is {self.recompute!r})")
            elif unknown or not self.recompute_modules:
                problems.append(f"model.recompute_modules must be a non-empty subset of "
                                f"{RECOMPUTE_MODULES} (a dense LoopLM layer has no MoE, MLA or "
                                f"gated-delta-net parts), got {self.recompute_modules}")
        return problems

    def megatron_recompute(self) -> dict:
        """The recompute fields of megatron's TransformerConfig."""
        if self.recompute == "none":
            return dict(recompute_granularity=None)
        if self.recompute == "selective":
            return dict(recompute_granularity="selective",
                        recompute_modules=(None if self.recompute_modules is None
                                           else list(self.recompute_modules)))
        return dict(recompute_granularity="full",
                    recompute_method=self.recompute_method or "uniform",
                    recompute_num_layers=self.recompute_num_layers or 1)

    def transformer_config(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                           sequence_parallel: bool = False,
                           use_cpu_initialization: bool | None = None) -> LoopTransformerConfig:
        self.validate(tensor_parallel, pipeline_parallel)
        core_attention = resolve_attention_backend(self.attention_backend)
        if "layernorm" in (self.recompute_modules or []) and core_attention != "te":
            raise ValueError("model.recompute_modules 'layernorm' needs Transformer Engine "
                             "(megatron-core 0.19.2 checkpoints the norms through TE's FP8 "
                             f"state); attention_backend {self.attention_backend!r} runs "
                             f"{core_attention!r} here: use core_attn and/or mlp")
        dtype = _DTYPES[self.params_dtype]
        if use_cpu_initialization is None:
            use_cpu_initialization = not torch.cuda.is_available()
        return LoopTransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups or self.num_attention_heads,
            kv_channels=self.hidden_size // self.num_attention_heads,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            attention_dropout=self.attention_dropout,
            hidden_dropout=self.hidden_dropout,
            init_method_std=self.init_std,
            embedding_init_method_std=self.embedding_init_std,
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            sequence_parallel=sequence_parallel and tensor_parallel > 1,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            # Separate isend/irecv: the loop pipeline keeps sends in flight while it computes.
            batch_p2p_comm=False,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu_initialization=use_cpu_initialization,
            num_loops=self.num_loops,
            layer_spec=self.layer_spec,
            core_attention=core_attention,
            **self.megatron_recompute(),
            vocab_size=self.vocab_size,
            max_sequence_length=self.max_sequence_length,
            rotary_base=self.rope_theta,
            share_embeddings_and_output_weights=self.tie_word_embeddings,
        )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


# ----- the model config as a file, and what a checkpoint's config must agree on -----


def write_model_config(config: LoopModelConfig, path) -> None:
    """``config`` as YAML (loadable as ``model=<path>`` and by :func:`read_model_config`)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))


def read_model_config(path) -> LoopModelConfig:
    """A model-config YAML → a validated :class:`LoopModelConfig`; unknown keys are errors."""
    config = read_section(path, LoopModelConfig)
    config.validate()
    return config


def model_config_of(config: LoopTransformerConfig, name: str = "looplm") -> LoopModelConfig:
    """The :class:`LoopModelConfig` a built model's TransformerConfig came from (the inverse of
    ``transformer_config``; ``name`` and ``extra`` do not reach the model)."""
    return LoopModelConfig(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups, vocab_size=config.vocab_size,
        max_sequence_length=config.max_sequence_length, num_loops=config.num_loops,
        rope_theta=config.rotary_base, layer_spec=config.layer_spec,
        norm_epsilon=config.layernorm_epsilon, init_std=config.init_method_std,
        embedding_init_std=(None if config.embedding_init_method_std == config.init_method_std
                            else config.embedding_init_method_std),
        tie_word_embeddings=config.share_embeddings_and_output_weights,
        attention_dropout=config.attention_dropout, hidden_dropout=config.hidden_dropout,
        params_dtype=next(k for k, v in _DTYPES.items() if v == config.params_dtype),
        attention_backend=config.core_attention, **_recompute_fields(config), name=name)


def _recompute_fields(config: LoopTransformerConfig) -> dict:
    granularity = config.recompute_granularity
    if granularity is None:
        return {}
    if granularity == "selective":
        return dict(recompute="selective", recompute_modules=list(config.recompute_modules))
    return dict(recompute="full", recompute_method=config.recompute_method,
                recompute_num_layers=config.recompute_num_layers)


# Fields that do not change the function the weights compute: initialisation, training-time
# dropout, the longest sequence (RoPE is computed per position), the storage precision, the
# attention kernel, activation recompute and the label. Every other field — including ones added
# later — must match a checkpoint's.
FUNCTION_NEUTRAL_FIELDS = frozenset({"name", "init_std", "embedding_init_std",
                                     "attention_dropout", "hidden_dropout",
                                     "max_sequence_length", "params_dtype", "attention_backend",
                                     "recompute", "recompute_method", "recompute_num_layers",
                                     "recompute_modules"})


def architecture_differences(saved: LoopModelConfig, current: LoopModelConfig
                             ) -> list[tuple[str, object, object]]:
    """(field, saved value, current value) for every field that changes what the weights
    compute (attention heads, query groups, loops, RoPE θ, norms, vocabulary, layer spec, …)."""
    from dataclasses import fields

    def normalised(config: LoopModelConfig, name: str):
        value = getattr(config, name)
        if name == "num_query_groups" and value is None:
            return config.num_attention_heads  # None means one group per head
        return value

    return [(f.name, normalised(saved, f.name), normalised(current, f.name))
            for f in fields(LoopModelConfig) if f.name not in FUNCTION_NEUTRAL_FIELDS
            and normalised(saved, f.name) != normalised(current, f.name)]


def parameter_count(config: LoopModelConfig) -> int:
    """Parameters of the whole model (all pipeline stages, unsharded), without building it."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    groups = config.num_query_groups or heads
    head_dim = hidden // heads
    norms = 4 if config.layer_spec == "sandwich" else 2
    layer = (norms * hidden + hidden * head_dim * (heads + 2 * groups) + heads * head_dim * hidden
             + hidden * 2 * config.ffn_hidden_size + config.ffn_hidden_size * hidden)
    heads_and_embedding = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    final_norm_and_exit_gate = hidden + hidden + 1
    return heads_and_embedding + config.num_layers * layer + final_norm_and_exit_gate


def dtype_bytes(config: LoopModelConfig) -> int:
    return torch.finfo(_DTYPES[config.params_dtype]).bits // 8
