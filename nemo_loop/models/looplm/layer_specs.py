"""Layer specs for the LoopLM: Ouro's sandwich layer and the plain pre-norm layer.

Each comes as a local spec (megatron-core modules only) and, when Transformer Engine imports
and a GPU is present, a TE spec. Ouro's sandwich layer normalizes each sublayer's *output*
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
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from nemo_loop.models.looplm.config import LAYER_SPECS

BACKENDS = ("auto", "local", "te")


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


def transformer_engine_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE install is as good as none
        return False
    return True


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown layer backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "te" if transformer_engine_usable() else "local"
    if backend == "te" and not transformer_engine_usable():
        raise RuntimeError(
            "layer backend 'te' needs Transformer Engine and a CUDA GPU. It ships in the NGC "
            "PyTorch container (see containers/Dockerfile); use backend 'local' elsewhere."
        )
    return backend


def loop_layer_spec(layer_spec: str, backend: str = "auto") -> ModuleSpec:
    """The ModuleSpec of one shared LoopLM layer."""
    if layer_spec not in LAYER_SPECS:
        raise ValueError(f"unknown layer_spec {layer_spec!r}; choose one of {LAYER_SPECS}")
    if resolve_backend(backend) == "te":
        base = get_gpt_layer_with_transformer_engine_spec()
        from megatron.core.extensions.transformer_engine import TENorm as norm_builder
    else:
        base = get_gpt_layer_local_spec(normalization="RMSNorm")
        norm_builder = base.submodules.input_layernorm
    if layer_spec == "prenorm":
        return base
    fields = {name: getattr(base.submodules, name)
              for name in TransformerLayerSubmodules.__dataclass_fields__}
    return ModuleSpec(
        module=SandwichTransformerLayer,
        submodules=SandwichLayerSubmodules(**fields, post_self_attn_layernorm=norm_builder,
                                           post_mlp_layernorm=norm_builder),
    )
