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
from nemo_loop.utils.distributed import ParallelConfig, initialize_model_parallel
from tests.multiproc import run_checks
from tests.unit.test_distillation_loss import (
    ALL_CASES,
    FP32_RTOL,
    FP64_RTOL,
    GUARDED_PATHS,
    HARMLESS,
    HEAD_PATHS,
    HIDDEN,
    POISON,
    POISON_MESSAGE,
    TEACHER_HEAD_CASES,
    VOCAB,
    assert_close,
    fully_fused_inputs,
    guard_inputs,
    guarded_loss,
    loss_and_grad,
    loss_and_head_grads,
    make_config,
    make_inputs,
    poisoned,
    reference_loss,
    teacher_head_config,
    teacher_head_token_ids,
)

pytestmark = [pytest.mark.parity]


def _tp_group():
    initialize_model_parallel(ParallelConfig(tensor_parallel=torch.distributed.get_world_size()))
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
        config = make_config(divergence, "linear", "uniform", aggregation="token_mean")
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


def check_teacher_through_the_fused_head_equals_teacher_logits():
    """Sharded teacher readouts × head shard against the sharded teacher logits, same TP."""
    group, vocab = _tp_group()
    hidden, weight, teacher_hidden, teacher_weight, mask = fully_fused_inputs()
    for case in TEACHER_HEAD_CASES:
        config = teacher_head_config(*case)
        extra = teacher_head_token_ids(config, mask)
        teacher_logits = teacher_hidden @ teacher_weight[vocab].t()
        from_logits = loss_and_head_grads(hidden, weight[vocab], teacher_logits, mask, config,
                                          group, **extra)
        fully_fused = loss_and_head_grads(hidden, weight[vocab], teacher_hidden, mask, config,
                                          group, teacher_output_weight=teacher_weight[vocab],
                                          **extra)
        for name, got, expected in zip(("loss", "hidden grad", "weight grad"), fully_fused,
                                       from_logits):
            assert_close(got, expected, 1e-12, f"{case} {name}")
        for name, value in from_logits[3].items():
            assert_close(fully_fused[3][name], value, 1e-12, f"{case} {name}")


def check_nonfinite_logits_on_one_shard_stop_or_skip_on_every_rank():
    # POISON's vocabulary ids 1 and 20 lie on the first and the last rank's shard only
    group, vocab = _tp_group()
    for path in GUARDED_PATHS:
        inputs = poisoned(guard_inputs(), path, POISON + HARMLESS)
        with pytest.raises(ValueError, match=POISON_MESSAGE):
            guarded_loss(path, inputs, tp_group=group, vocab=vocab)
        loss, grad, metrics = guarded_loss(path, inputs, tp_group=group, vocab=vocab,
                                           nonfinite="skip")
        expected, expected_grad, _ = guarded_loss(path, inputs, nonfinite="skip")  # TP = 1
        assert metrics["nonfinite_tokens"] == 3, path
        assert_close(loss, expected, FP64_RTOL, f"{path} loss")
        # the fused paths' hidden-state gradient is replicated, the others are vocab shards
        assert_close(grad, expected_grad if path in HEAD_PATHS else expected_grad[..., vocab],
                     FP64_RTOL, f"{path} grad")


def check_sampled_token_ids_outside_the_full_vocabulary_raise_on_every_rank():
    group, vocab = _tp_group()
    inputs = guard_inputs()
    for bad_id in (VOCAB, VOCAB + 5, -1):  # used to count as "on no rank's shard"
        inputs["token_ids"][4, 1] = bad_id
        with pytest.raises(ValueError, match=rf"token_ids must lie in \[0, {VOCAB}\)"):
            guarded_loss("sampled", inputs, tp_group=group, vocab=vocab)


CHECKS = sorted(name for name in dict(globals()) if name.startswith("check_"))


@pytest.fixture(scope="module", params=[2, 4], ids=lambda tp: f"tp{tp}")
def results(request):
    return run_checks(__name__, CHECKS, world_size=request.param)


@pytest.mark.parametrize("check", CHECKS)
def test_tensor_parallel(results, check):
    if results[check] is not None:
        pytest.fail(results[check], pytrace=False)
