"""Layer specs for the LoopLM: Ouro's sandwich layer and the plain pre-norm layer.

Each comes as a local spec (megatron-core modules only; core attention through torch's SDPA or
megatron's ``DotProductAttention``) and, when Transformer Engine imports and a GPU is present, a
TE spec: ``config.core_attention`` (the resolved ``model.attention_backend``, see
``nemo_loop.models.looplm.attention``) chooses. Ouro's sandwich layer normalizes each sublayer's *output*
before the residual add (four RMSNorms per layer). megatron-core's TransformerLayer has no slot
for an output norm, so ``SandwichTransformerLayer`` applies it inside the bias-dropout-add step,
which every attention and MLP output passes through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from nemo_loop.models.looplm.attention import SDPAttention
from nemo_loop.models.looplm.config import LAYER_SPECS

CORE_ATTENTIONS = ("sdpa", "dot_product", "te")  # resolved attention backends


@dataclass
class SandwichLayerSubmodules(TransformerLayerSubmodules):
    post_self_attn_layernorm: object = IdentityOp
    post_mlp_layernorm: object = IdentityOp


class SandwichTransformerLayer(TransformerLayer):
    """x ← x + N₂(Attn(N₁(x))); x ← x + N₄(MLP(N₃(x))), as in Ouro."""

    def __init__(self, config, submodules: SandwichLayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        norm_kwargs = dict(config=self.config, hidden_size=self.config.hidden_size,
                           eps=self.config.layernorm_epsilon)
        self.post_self_attn_layernorm = submodules.post_self_attn_layernorm(**norm_kwargs)
        self.post_mlp_layernorm = submodules.post_mlp_layernorm(**norm_kwargs)
        self.self_attn_bda = _normalize_then(self.self_attn_bda, self.post_self_attn_layernorm)
        self.mlp_bda = _normalize_then(self.mlp_bda, self.post_mlp_layernorm)


class LoopRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm usable with sequence parallelism.

    megatron-core's torch-norm wrapper refuses sequence parallelism because its weights would
    need their TP-partial grads summed; tagging the weight ``sequence_parallel`` is exactly what
    makes ``finalize_model_grads`` do that.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


def _normalize_then(bias_dropout_add, norm):
    def bda_factory(training, fused):
        inner = bias_dropout_add(training, fused)

        def apply(output_with_bias, residual, prob):
            output, bias = output_with_bias
            if bias is not None:
                output = output + bias
            return inner((norm(output), None), residual, prob)

        return apply

    return bda_factory


def loop_layer_spec(layer_spec: str, core_attention: str) -> ModuleSpec:
    """The ModuleSpec of one shared LoopLM layer with the given (resolved) attention backend."""
    if layer_spec not in LAYER_SPECS:
        raise ValueError(f"unknown layer_spec {layer_spec!r}; choose one of {LAYER_SPECS}")
    base, norm_builder = _base_spec(core_attention)
    fields = {name: getattr(base.submodules, name)
              for name in TransformerLayerSubmodules.__dataclass_fields__}
    if layer_spec == "prenorm":
        return ModuleSpec(module=TransformerLayer,
                          submodules=TransformerLayerSubmodules(**fields))
    return ModuleSpec(
        module=SandwichTransformerLayer,
        submodules=SandwichLayerSubmodules(**fields, post_self_attn_layernorm=norm_builder,
                                           post_mlp_layernorm=norm_builder),
    )


def loop_block_spec(config) -> TransformerBlockSubmodules:
    """This pipeline stage's slice of the shared layers, plus the final (per-loop) norm."""
    layer = loop_layer_spec(config.layer_spec, config.core_attention)
    _, norm_builder = _base_spec(config.core_attention)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=norm_builder)


def _base_spec(core_attention: str):
    if core_attention not in CORE_ATTENTIONS:
        raise ValueError(f"unknown core attention {core_attention!r}; choose one of "
                         f"{CORE_ATTENTIONS} (model.attention_backend resolves to one)")
    if core_attention == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return get_gpt_layer_with_transformer_engine_spec(), TENorm
    base = get_gpt_layer_local_spec(normalization="RMSNorm")
    base.submodules.input_layernorm = LoopRMSNorm
    base.submodules.pre_mlp_layernorm = LoopRMSNorm
    base.submodules.self_attention.submodules.core_attention = (
        SDPAttention if core_attention == "sdpa" else DotProductAttention)
    return base, LoopRMSNorm
