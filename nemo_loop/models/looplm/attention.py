"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``, and the choice of
core attention (``model.attention_backend``).

megatron-core's local ``DotProductAttention`` materializes the ``[b, heads, s, s]`` scores and
keeps the probabilities for backward: one such tensor per layer *per loop* in a LoopLM. torch's
SDPA picks a fused kernel (flash / memory-efficient / cuDNN on CUDA, the flash kernel on CPU)
that keeps O(s) per head instead, and needs nothing beyond torch: no Transformer Engine to
install or carry. ``SDPAttention`` is a drop-in ``core_attention`` for megatron's ``Attention``:
same constructor, same ``forward(query, key, value, attention_mask, attn_mask_type=...)`` with
``[s, b, heads, head_dim]`` inputs and a ``[s, b, heads·head_dim]`` output, so forward
pre-hooks written for megatron's module (the KV cache, the OISD attention probe) keep working.

Masks follow megatron's convention: a bool tensor, True = may not attend, broadcastable to
``[b, 1, sq, sk]``. It is turned into an additive mask (−10000 where masked, as megatron's
``attention_mask_func`` fills) once per mask tensor and dtype, not once per layer and loop,
and a row whose keys are all masked (a left-padded query) stays finite instead of becoming NaN,
as in megatron. Without a mask, ``attn_mask_type`` decides: causal (sq = sk) uses the kernels'
own causal mode; a single query, or ``no_mask`` (the KV-cache decode step, sq < sk), attends to
every key.

Backends (``ATTENTION_BACKENDS``): ``sdpa`` this module in megatron's local layer spec;
``dot_product`` megatron's ``DotProductAttention`` in the same spec (the reference);
``te`` Transformer Engine's layer spec (NGC container + GPU); ``auto`` = ``te`` where Transformer
Engine imports and a GPU is present, else ``sdpa``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide
from torch.utils.weak import WeakIdKeyDictionary

ATTENTION_BACKENDS = ("auto", "sdpa", "dot_product", "te")
MASKED_SCORE = -10000.0  # what megatron's attention_mask_func writes into masked scores

# bool mask tensor → {dtype: additive mask}; entries go with the bool mask.
_ADDITIVE_MASKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def transformer_engine_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE install is as good as none
        return False
    return True


def resolve_attention_backend(name: str) -> str:
    """``model.attention_backend`` → the concrete backend this machine runs."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend must be one of {ATTENTION_BACKENDS}, "
                         f"got {name!r}")
    if name == "auto":
        return "te" if transformer_engine_usable() else "sdpa"
    if name == "te" and not transformer_engine_usable():
        raise RuntimeError(
            "model.attention_backend 'te' needs Transformer Engine and a CUDA GPU. It ships in "
            "the NGC PyTorch container (see containers/Dockerfile); use 'sdpa' (or 'auto') "
            "elsewhere.")
    return name


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """megatron's bool mask (True = masked) as an additive mask of ``dtype``, made once per mask
    tensor: every layer and loop of a micro-batch passes the same tensor, and SDPA then keeps
    one shared copy for backward instead of one per call."""
    if mask.dtype != torch.bool:
        raise TypeError(f"attention_mask must be bool (True = may not attend), got {mask.dtype}")
    per_dtype = _ADDITIVE_MASKS.get(mask)
    if per_dtype is None:
        per_dtype = _ADDITIVE_MASKS[mask] = {}
    if dtype not in per_dtype:
        per_dtype[dtype] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, MASKED_SCORE)
    return per_dtype[dtype]


class SDPAttention(MegatronModule):
    """megatron-core ``core_attention`` (the slot ``DotProductAttention`` fills) through
    ``scaled_dot_product_attention``. Tensor parallelism: each rank attends with its own heads,
    as the column-parallel QKV projection hands them out."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        unsupported = {"context_parallel_size": config.context_parallel_size != 1,
                       "window_size": config.window_size is not None,
                       "softmax_type": config.softmax_type != "vanilla"}
        refused = [name for name, present in unsupported.items() if present]
        if refused:
            raise ValueError(f"SDPAttention does not support {refused} (use "
                             f"model.attention_backend te)")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp_size)
        self.groups = divide(config.num_query_groups, tp_size)
        self.hidden_size_per_partition = self.heads * config.kv_channels
        # megatron's query-key layer scaling divides the scale by the layer number and multiplies
        # the scores back inside the softmax: the same probabilities, so it is left out here.
        self.softmax_scale = (1.0 / math.sqrt(config.kv_channels) if softmax_scale is None
                              else softmax_scale)
        self.dropout_p = config.attention_dropout if attention_dropout is None \
            else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        """``[sq, b, heads, d]``, ``[sk, b, groups, d]`` × 2, a bool mask or None →
        ``[sq, b, heads·d]`` (this rank's heads)."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention takes no attention_bias or packed sequences "
                             "(use model.attention_backend te)")
        sq, batch, sk = query.shape[0], query.shape[1], key.shape[0]
        mask, causal = self._mask(attention_mask, attn_mask_type or self.attn_mask_type, sq, sk,
                                  query.dtype)
        if self.heads != self.groups and mask is not None:
            # The memory-efficient CUDA kernel (the one that takes masks) has no grouped-query
            # mode, and SDPA would fall back to the O(s²) math path: repeat the groups instead.
            key = key.repeat_interleave(self.heads // self.groups, dim=2)
            value = value.repeat_interleave(self.heads // self.groups, dim=2)
        # [s, b, heads, d] → [b, heads, s, d] (views)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=mask, dropout_p=dropout, is_causal=causal,
                      scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])
        if dropout > 0 and not self.config.sequence_parallel:
            # As DotProductAttention: dropout draws from the model-parallel RNG stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        # [b, heads, sq, d] → [sq, b, heads·d]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, self.hidden_size_per_partition)

    @staticmethod
    def _mask(attention_mask, mask_type, sq: int, sk: int, dtype
              ) -> tuple[torch.Tensor | None, bool]:
        """(additive mask or None, is_causal)."""
        if attention_mask is not None:
            return additive_mask(attention_mask, dtype), False
        if mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError(f"a causal attention without a mask needs as many queries as "
                                 f"keys, got {sq} queries and {sk} keys (pass attn_mask_type "
                                 f"no_mask for queries that may see every cached key)")
            return None, True
        return None, False
