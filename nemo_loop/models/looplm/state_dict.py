"""Full (unsharded) LoopLM state dicts ⇄ this rank's TP/PP shard.

The full layout is the TP=1/PP=1 one, with global layer indices. It is what converters, refit
and parity tests exchange; training checkpoints use megatron-core's dist_checkpointing instead.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _layer_offset(model) -> int:
    layers_per_stage = model.config.num_layers // parallel_state.get_pipeline_model_parallel_world_size()
    return parallel_state.get_pipeline_model_parallel_rank() * layers_per_stage


def _global_name(local_name: str, offset: int) -> str:
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local_name)


def _is_gated_fc1(name: str, model) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit


def _local_tensors(model, use_grads: bool):
    offset = _layer_offset(model)
    for name, param in model.named_parameters():
        if use_grads:
            tensor = getattr(param, "main_grad", None)
            tensor = param.grad if tensor is None else tensor
            if tensor is None:
                tensor = torch.zeros_like(param)
        else:
            tensor = param
        yield _global_name(name, offset), name, param, tensor.detach()


def _split_for_rank(full: torch.Tensor, param, gated: bool, rank: int, size: int):
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return full
    dim = param.partition_dim
    if gated:  # megatron keeps [gate_shard; up_shard] on each rank
        gate, up = torch.chunk(full, 2, dim=dim)
        return torch.cat([torch.chunk(gate, size, dim)[rank], torch.chunk(up, size, dim)[rank]],
                         dim=dim)
    return torch.chunk(full, size, dim=dim)[rank]


def _gather_tp(local: torch.Tensor, param, gated: bool) -> torch.Tensor:
    size = parallel_state.get_tensor_model_parallel_world_size()
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return local.clone()
    shards = [torch.empty_like(local) for _ in range(size)]
    torch.distributed.all_gather(shards, local.contiguous(),
                                 group=parallel_state.get_tensor_model_parallel_group())
    dim = param.partition_dim
    if gated:
        halves = [torch.chunk(s, 2, dim=dim) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves],
                                                                           dim)], dim)
    return torch.cat(shards, dim=dim)


def gather_full_state_dict(model, use_grads: bool = False) -> dict[str, torch.Tensor]:
    """Every rank gets the full TP=1/PP=1 state dict (or the gradients, with ``use_grads``)."""
    model = unwrap_model(model)
    stage_dict = {}
    for global_name, local_name, param, tensor in _local_tensors(model, use_grads):
        stage_dict[global_name] = _gather_tp(tensor, param, _is_gated_fc1(local_name, model)).cpu()
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return stage_dict
    stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(stages, stage_dict,
                                        group=parallel_state.get_pipeline_model_parallel_group())
    return {name: tensor for stage in stages for name, tensor in stage.items()}


@torch.no_grad()
def load_full_state_dict(model, full: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy this rank's shard of a full TP=1/PP=1 state dict into ``model``."""
    model = unwrap_model(model)
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    seen = set()
    for global_name, local_name, param, _ in _local_tensors(model, use_grads=False):
        if global_name not in full:
            raise KeyError(f"state dict has no tensor for parameter {global_name!r}")
        shard = _split_for_rank(full[global_name], param, _is_gated_fc1(local_name, model),
                                rank, size)
        if shard.shape != param.shape:
            raise ValueError(f"{global_name}: shard shape {tuple(shard.shape)} does not match "
                             f"parameter shape {tuple(param.shape)} (TP rank {rank}/{size})")
        param.copy_(shard)
        seen.add(global_name)
    if strict and parallel_state.get_pipeline_model_parallel_world_size() == 1:
        unknown = sorted(set(full) - seen)
        if unknown:
            raise KeyError(f"state dict has tensors the model does not: {unknown[:5]}")
