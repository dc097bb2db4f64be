"""Cross-loop distillation with the vocabulary sharded over TP = 2 and 4 ranks (gloo, CPU).

Every rank builds the same full-vocabulary tensors from a fixed seed, runs the loss on its
vocabulary slice, and compares the loss with the float64 full-vocabulary reference and its local
gradient with the matching slice of the reference gradient.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from megatron.core import parallel_state

from nemo_loop.losses import (
    DIVERGENCES,
    cross_loop_distillation_loss,
    fused_head_distillation_loss,
    sampled_token_distillation_loss,
)
from nemo_loop.utils.distributed import ParallelLayout, initialize_model_parallel
from tests.multiproc import run_checks
from tests.unit.test_distillation_loss import (
    ALL_CASES,
    FP32_RTOL,
    FP64_RTOL,
    HIDDEN,
    VOCAB,
    assert_close,
    loss_and_grad,
    make_config,
    make_inputs,
    reference_loss,
)

pytestmark = [pytest.mark.parity]


def _tp_group():
    initialize_model_parallel(ParallelLayout(tensor_parallel=torch.distributed.get_world_size()))
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    shard = VOCAB // size
    return group, slice(rank * shard, (rank + 1) * shard)


def _compare_with_reference(config, group, vocab, dtype=torch.float64, rtol=FP64_RTOL, seed=0,
                            reference_config=None):
    student, teacher, mask = make_inputs(seed=seed)
    expected, expected_grad, _ = loss_and_grad(reference_loss, student, teacher, mask,
                                               reference_config or config)
    loss, grad, _ = loss_and_grad(cross_loop_distillation_loss, student[..., vocab].to(dtype),
                                  teacher[..., vocab].to(dtype), mask, config, group)
    assert_close(loss, expected, rtol, f"loss {config}")
    assert_close(grad, expected_grad[..., vocab], rtol, f"grad {config}")


def check_every_divergence_mapping_and_weighting():
    group, vocab = _tp_group()
    for divergence, mapping, weighting in ALL_CASES:
        _compare_with_reference(make_config(divergence, mapping, weighting), group, vocab)


def check_fp32_and_token_mean():
    group, vocab = _tp_group()
    for divergence in DIVERGENCES:
        config = make_config(divergence, "linear", "uniform", reduction="token_mean")
        _compare_with_reference(config, group, vocab, torch.float32, FP32_RTOL, seed=1)


def check_chunked_equals_unchunked():
    group, vocab = _tp_group()
    for divergence, chunk_size in itertools.product(DIVERGENCES, (None, 1, 5)):
        config = make_config(divergence, "shift", "adaptive", chunk_size=chunk_size)
        _compare_with_reference(config, group, vocab, seed=2)


def check_top_k():
    group, vocab = _tp_group()
    for divergence, mode, k in itertools.product(DIVERGENCES, ("tail", "renormalize"), (1, 5)):
        config = make_config(divergence, "linear", "late_heavy", top_k=k, top_k_mode=mode)
        _compare_with_reference(config, group, vocab, seed=3)
    for divergence in DIVERGENCES:  # K = V reproduces the full loss
        full = make_config(divergence, "fixed", "uniform")
        _compare_with_reference(replace(full, top_k=VOCAB), group, vocab, seed=4,
                                reference_config=full)


def check_sampled_token():
    group, vocab = _tp_group()
    student, teacher, mask = make_inputs(seed=5)
    token_ids = torch.randint(0, VOCAB, mask.shape, generator=torch.Generator().manual_seed(0))
    for weighting in ("uniform", "adaptive"):
        config = make_config("forward_kl", "linear", weighting)
        expected, expected_grad, _ = loss_and_grad(reference_loss, student, teacher, mask, config,
                                                   token_ids=token_ids)
        loss, grad, _ = loss_and_grad(sampled_token_distillation_loss, student[..., vocab],
                                      teacher[..., vocab], token_ids, mask, config, group)
        assert_close(loss, expected, FP64_RTOL, "loss")
        assert_close(grad, expected_grad[..., vocab], FP64_RTOL, "grad")


def check_fused_head():
    group, vocab = _tp_group()
    gen = torch.Generator().manual_seed(6)
    _, teacher, mask = make_inputs(seed=6)
    hidden = torch.randn(2, *mask.shape, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64)
    for divergence, weighting in (("jsd", "explicit"), ("forward_kl", "adaptive")):
        config = make_config(divergence, "linear", weighting)
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        expected, _ = reference_loss(h @ w.t(), teacher, mask, config)
        expected_h, expected_w = torch.autograd.grad(expected, (h, w))
        h, w = hidden.clone().requires_grad_(True), weight[vocab].clone().requires_grad_(True)
        loss, _ = fused_head_distillation_loss(h, w, teacher[..., vocab], mask, config, group)
        grad_h, grad_w = torch.autograd.grad(loss, (h, w))
        assert_close(loss, expected, FP64_RTOL, "loss")
        assert_close(grad_h, expected_h, FP64_RTOL, "hidden grad")
        assert_close(grad_w, expected_w[vocab], FP64_RTOL, "weight grad")


CHECKS = sorted(name for name in dict(globals()) if name.startswith("check_"))


@pytest.fixture(scope="module", params=[2, 4], ids=lambda tp: f"tp{tp}")
def results(request):
    return run_checks(__name__, CHECKS, world_size=request.param)


@pytest.mark.parametrize("check", CHECKS)
def test_tensor_parallel(results, check):
    if results[check] is not None:
        pytest.fail(results[check], pytrace=False)
