"""Cross-loop distillation loss against a plain float64 full-vocabulary reference (TP = 1)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from nemo_loop.losses import (
    DIVERGENCES,
    LoopDistillConfig,
    LossNormalizer,
    adaptive_loop_weights,
    cross_loop_distillation_loss,
    fused_head_distillation_loss,
    loop_mapping,
    loop_weights,
    sampled_token_distillation_loss,
)

STUDENT_LOOPS, TEACHER_LOOPS, SEQ, BATCH, VOCAB, HIDDEN = 2, 3, 5, 3, 24, 8
MAPPING_CASES = {"shift": None, "linear": None, "fixed": None, "explicit": (2, 3)}
WEIGHTING_CASES = {"terminal": None, "uniform": None, "late_heavy": None,
                   "explicit": (0.25, 0.75), "adaptive": None}
FP64_RTOL, FP32_RTOL = 1e-6, 1e-5


# ----------------------------------------------------------------------------- reference
def reference_per_token(log_p_s, log_p_t, config: LoopDistillConfig):
    """Plain per-token divergence over full-vocabulary (or bucket) log-probabilities."""
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    if config.divergence == "forward_kl":
        return torch.xlogy(p_t, p_t).sum(-1) - (p_t * log_p_s).sum(-1)
    if config.divergence == "reverse_kl":
        return torch.xlogy(p_s, p_s).sum(-1) - (p_s * log_p_t).sum(-1)
    m = config.beta * p_t + (1 - config.beta) * p_s
    kl_t = torch.xlogy(p_t, p_t).sum(-1) - torch.xlogy(p_t, m).sum(-1)
    kl_s = torch.xlogy(p_s, p_s).sum(-1) - torch.xlogy(p_s, m).sum(-1)
    return config.beta * kl_t + (1 - config.beta) * kl_s


def reference_top_k(scaled_s, scaled_t, config: LoopDistillConfig):
    ids = scaled_t.topk(config.top_k, dim=-1).indices
    if config.top_k_mode == "renormalize":
        return (torch.log_softmax(scaled_s.gather(-1, ids), -1),
                torch.log_softmax(scaled_t.gather(-1, ids), -1))
    buckets = []
    for scaled in (scaled_s, scaled_t):
        log_p = torch.log_softmax(scaled, -1)
        top = log_p.gather(-1, ids)
        tail = (1 - top.exp().sum(-1, keepdim=True)).clamp(min=0).log()
        buckets.append(torch.cat([top, tail], -1))
    return buckets


def reference_loss(student_logits, teacher_logits, loss_mask, config: LoopDistillConfig,
                   token_ids=None):
    """The loss spelled out with torch.log_softmax on the full vocabulary; α is detached."""
    student_loops, teacher_loops = student_logits.shape[0], teacher_logits.shape[0]
    phi = loop_mapping(config.mapping, student_loops, teacher_loops, config.mapping_list)
    mask = loss_mask.double()
    per_sequence_tokens = mask.sum(0)
    losses, divergences = [], []
    for r in range(student_loops):
        scaled_s = student_logits[r] / config.temperature
        scaled_t = teacher_logits[phi[r] - 1].detach() / config.temperature
        if token_ids is not None:
            log_q = torch.log_softmax(scaled_s, -1).gather(-1, token_ids[..., None])[..., 0]
            log_t = torch.log_softmax(scaled_t, -1).gather(-1, token_ids[..., None])[..., 0]
            advantage = (log_t - log_q).detach()
            per_token, divergence = -advantage * log_q, -advantage
        else:
            if config.top_k is not None:
                log_p_s, log_p_t = reference_top_k(scaled_s, scaled_t, config)
            else:
                log_p_s = torch.log_softmax(scaled_s, -1)
                log_p_t = torch.log_softmax(scaled_t, -1)
            per_token = divergence = reference_per_token(log_p_s, log_p_t, config)
        if config.aggregation == "sequence_mean":
            def reduce(x):
                means = (x * mask).sum(0) / per_sequence_tokens.clamp(min=1)
                return means[per_sequence_tokens > 0].mean()
        else:
            def reduce(x):
                return (x * mask).sum() / mask.sum()
        losses.append(reduce(per_token))
        divergences.append(reduce(divergence))
    losses, divergences = torch.stack(losses), torch.stack(divergences)
    if config.weighting == "adaptive":
        alpha = adaptive_loop_weights(divergences.detach())
    else:
        alpha = loop_weights(config.weighting, student_loops, config.gamma, config.weights_list)
    return (alpha.to(losses.dtype) * losses).sum(), {"divergence_per_loop": divergences.detach()}


def assert_close(actual, expected, rtol, what=""):
    scale = expected.abs().max().clamp(min=1e-12)
    error = (actual.double() - expected.double()).abs().max()
    assert error <= rtol * scale, f"{what}: max abs error {error:.3e} > {rtol:g} × {scale:.3e}"


def make_inputs(seed=0, dtype=torch.float64, vocab=VOCAB, seq=SEQ, batch=BATCH):
    gen = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(STUDENT_LOOPS, seq, batch, vocab, generator=gen, dtype=torch.float64)
    teacher = 2 * torch.randn(TEACHER_LOOPS, seq, batch, vocab, generator=gen,
                              dtype=torch.float64)
    mask = torch.ones(seq, batch)
    mask[:2] = 0  # prompt
    mask[:, 1] = 0  # a sequence without response tokens
    mask[-1, 1] = 1  # ... except its last token
    mask[-1, -1] = 0  # padding
    return student.to(dtype), teacher.to(dtype), mask


def make_config(divergence, mapping, weighting, **overrides) -> LoopDistillConfig:
    fields = dict(divergence=divergence, beta=0.3, temperature=1.7, mapping=mapping,
                  mapping_list=MAPPING_CASES[mapping], weighting=weighting,
                  weights_list=WEIGHTING_CASES[weighting], gamma=2.0, chunk_size=4)
    return LoopDistillConfig(**{**fields, **overrides})


def loss_and_grad(fn, student, *args, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    loss, metrics = fn(student, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad, metrics


ALL_CASES = list(itertools.product(DIVERGENCES, MAPPING_CASES, WEIGHTING_CASES))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("divergence,mapping,weighting", ALL_CASES)
def test_matches_float64_reference(divergence, mapping, weighting):
    student, teacher, mask = make_inputs()
    config = make_config(divergence, mapping, weighting)
    loss, grad, _ = loss_and_grad(cross_loop_distillation_loss, student, teacher, mask, config)
    expected, expected_grad, _ = loss_and_grad(reference_loss, student, teacher, mask, config)
    assert_close(loss, expected, FP64_RTOL, "loss")
    assert_close(grad, expected_grad, FP64_RTOL, "grad")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_fp32_and_bf16_inputs_match_reference(divergence, aggregation):
    student, teacher, mask = make_inputs()
    config = make_config(divergence, "linear", "uniform", aggregation=aggregation)
    expected, expected_grad, _ = loss_and_grad(reference_loss, student, teacher, mask, config)
    loss, grad, _ = loss_and_grad(cross_loop_distillation_loss, student.float(), teacher.float(),
                                  mask, config)
    assert grad.dtype == torch.float32
    assert_close(loss, expected, FP32_RTOL, "fp32 loss")
    assert_close(grad, expected_grad, FP32_RTOL, "fp32 grad")
    # bf16 inputs are computed in fp32: compare with the reference on the rounded inputs
    s16, t16 = student.bfloat16(), teacher.bfloat16()
    expected16, expected_grad16, _ = loss_and_grad(reference_loss, s16.double(), t16.double(),
                                                   mask, config)
    loss16, grad16, _ = loss_and_grad(cross_loop_distillation_loss, s16, t16, mask, config)
    assert grad16.dtype == torch.bfloat16
    assert_close(loss16, expected16, FP32_RTOL, "bf16 loss")
    assert_close(grad16, expected_grad16, 1e-2, "bf16 grad")  # rounded to bf16 on output


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("top_k_mode", ["tail", "renormalize"])
def test_gradcheck(divergence, top_k_mode):
    student, teacher, mask = make_inputs(vocab=6, seq=4, batch=2)
    student.requires_grad_(True)
    for top_k in (None, 4):
        config = make_config(divergence, "linear", "late_heavy", top_k=top_k,
                             top_k_mode=top_k_mode, chunk_size=3)
        assert torch.autograd.gradcheck(
            lambda s: cross_loop_distillation_loss(s, teacher, mask, config)[0], (student,))
    # the sampled-token objective is not gradchecked: its advantage is detached by definition,
    # so finite differences see a different function; it is compared with the reference instead


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_equals_unchunked(divergence):
    student, teacher, mask = make_inputs(seed=1)
    results = []
    for chunk_size in (None, 1, 3, 1000):
        config = make_config(divergence, "shift", "adaptive", chunk_size=chunk_size)
        results.append(loss_and_grad(cross_loop_distillation_loss, student, teacher, mask, config))
    for loss, grad, _ in results[1:]:
        assert_close(loss, results[0][0], 1e-12, "loss")
        assert_close(grad, results[0][1], 1e-12, "grad")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("top_k_mode", ["tail", "renormalize"])
def test_top_k_matches_reference(divergence, top_k_mode):
    student, teacher, mask = make_inputs(seed=2)
    config = make_config(divergence, "linear", "uniform", top_k=5, top_k_mode=top_k_mode)
    loss, grad, _ = loss_and_grad(cross_loop_distillation_loss, student, teacher, mask, config)
    expected, expected_grad, _ = loss_and_grad(reference_loss, student, teacher, mask, config)
    assert_close(loss, expected, FP64_RTOL, "loss")
    assert_close(grad, expected_grad, FP64_RTOL, "grad")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_top_k_equal_to_vocab_is_the_full_loss(divergence):
    student, teacher, mask = make_inputs(seed=3)
    full = make_config(divergence, "fixed", "uniform")
    loss, grad, metrics = loss_and_grad(cross_loop_distillation_loss, student, teacher, mask, full)
    top = replace(full, top_k=VOCAB, top_k_mode="tail")
    loss_k, grad_k, metrics_k = loss_and_grad(cross_loop_distillation_loss, student, teacher,
                                              mask, top)
    assert_close(loss_k, loss, 1e-12, "loss")
    assert_close(grad_k, grad, 1e-12, "grad")
    assert_close(metrics_k["divergence_per_loop"], metrics["divergence_per_loop"], 1e-12)


def test_top_k_tail_is_a_proper_divergence():
    student, teacher, mask = make_inputs(seed=4)
    for divergence in DIVERGENCES:
        config = make_config(divergence, "shift", "uniform", top_k=3, temperature=1.0)
        _, metrics = cross_loop_distillation_loss(student, teacher, mask, config)
        assert (metrics["divergence_per_loop"] >= 0).all()
        same, metrics = cross_loop_distillation_loss(teacher[1:], teacher, mask, config)
        assert same.abs() < 1e-12


def test_sampled_token_matches_reference():
    student, teacher, mask = make_inputs(seed=5)
    token_ids = torch.randint(0, VOCAB, (SEQ, BATCH), generator=torch.Generator().manual_seed(0))
    for weighting in ("late_heavy", "adaptive"):
        config = make_config("forward_kl", "linear", weighting)
        loss, grad, _ = loss_and_grad(sampled_token_distillation_loss, student, teacher,
                                      token_ids, mask, config)
        expected, expected_grad, _ = loss_and_grad(reference_loss, student, teacher, mask, config,
                                                   token_ids=token_ids)
        assert_close(loss, expected, FP64_RTOL, "loss")
        assert_close(grad, expected_grad, FP64_RTOL, "grad")


@pytest.mark.parametrize("weighting", ["late_heavy", "adaptive"])
def test_fused_head_equals_unfused(weighting):
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(STUDENT_LOOPS, SEQ, BATCH, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64)
    _, teacher, mask = make_inputs(seed=6)
    config = make_config("reverse_kl", "linear", weighting)

    def unfused(h, w):
        return cross_loop_distillation_loss(h @ w.t(), teacher, mask, config)

    results = []
    for fn in (unfused, lambda h, w: fused_head_distillation_loss(h, w, teacher, mask, config)):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, metrics = fn(h, w)
        results.append((loss.detach(), *torch.autograd.grad(loss, (h, w)),
                        metrics["divergence_per_loop"]))
    for name, fused, plain in zip(("loss", "hidden grad", "weight grad", "divergence"), *results):
        assert_close(fused, plain, 1e-12, name)


def fully_fused_inputs(seed=9, teacher_loops=TEACHER_LOOPS):
    """(student hidden, student W, teacher readouts, teacher W, mask); the teacher has its own
    head, as a frozen or EMA teacher does."""
    gen = torch.Generator().manual_seed(seed)
    _, _, mask = make_inputs(seed=seed)
    hidden = torch.randn(STUDENT_LOOPS, SEQ, BATCH, HIDDEN, generator=gen, dtype=torch.float64)
    teacher_hidden = torch.randn(teacher_loops, SEQ, BATCH, HIDDEN, generator=gen,
                                 dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64)
    teacher_weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64)
    return hidden, weight, teacher_hidden, teacher_weight, mask


def loss_and_head_grads(hidden, weight, teacher, mask, config, tp_group=None, **kwargs):
    """(loss, ∂/∂hidden, ∂/∂W, metrics) of the fused-head loss."""
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, metrics = fused_head_distillation_loss(h, w, teacher, mask, config, tp_group, **kwargs)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)), metrics)


# every divergence, full vocabulary and both top-K modes, plus the sampled-token objective
TEACHER_HEAD_CASES = [(d, k, m) for d in DIVERGENCES
                      for k, m in ((None, "tail"), (5, "tail"), (5, "renormalize"))]
TEACHER_HEAD_CASES.append(("sampled_token", None, "tail"))


def teacher_head_config(divergence, top_k, top_k_mode):
    sampled = divergence == "sampled_token"
    return make_config("forward_kl" if sampled else divergence, "linear", "adaptive",
                       top_k=top_k, top_k_mode=top_k_mode, chunk_size=4,
                       objective="sampled_token" if sampled else "full")


def teacher_head_token_ids(config, mask):
    if config.objective != "sampled_token":
        return {}
    return {"token_ids": torch.randint(0, VOCAB, mask.shape,
                                       generator=torch.Generator().manual_seed(1))}


@pytest.mark.parametrize("divergence,top_k,top_k_mode", TEACHER_HEAD_CASES)
def test_teacher_through_the_fused_head_equals_teacher_logits(divergence, top_k, top_k_mode):
    hidden, weight, teacher_hidden, teacher_weight, mask = fully_fused_inputs()
    config = teacher_head_config(divergence, top_k, top_k_mode)
    extra = teacher_head_token_ids(config, mask)
    from_logits = loss_and_head_grads(hidden, weight, teacher_hidden @ teacher_weight.t(), mask,
                                      config, **extra)
    fully_fused = loss_and_head_grads(hidden, weight, teacher_hidden, mask, config,
                                      teacher_output_weight=teacher_weight, **extra)
    for name, got, expected in zip(("loss", "hidden grad", "weight grad"), fully_fused,
                                   from_logits):
        assert_close(got, expected, 1e-12, name)
    for name, value in from_logits[3].items():
        assert_close(fully_fused[3][name], value, 1e-12, name)


def test_bf16_heads_match_the_reference_on_the_rounded_inputs():
    """bf16 runs form logits and both gradient products in bf16 (summed in fp32)."""
    *tensors, mask = fully_fused_inputs()
    hidden, weight, teacher_hidden, teacher_weight = (t.bfloat16() for t in tensors)
    config = make_config("forward_kl", "linear", "adaptive", chunk_size=4)
    loss, grad_h, grad_w, _ = loss_and_head_grads(hidden, weight, teacher_hidden, mask, config,
                                                  teacher_output_weight=teacher_weight)
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16
    expected = loss_and_head_grads(hidden.double(), weight.double(),
                                   teacher_hidden.double() @ teacher_weight.double().t(), mask,
                                   config)
    assert_close(loss, expected[0], 2e-3, "loss")  # measured 2e-4
    assert_close(grad_h, expected[1], 1.5e-2, "hidden grad")  # measured 5e-3: bf16 rounding
    assert_close(grad_w, expected[2], 1.5e-2, "weight grad")


def test_a_self_teacher_head_passes_no_gradient():
    """Teacher mode "same": the teacher's head is the student's own weight, still a constant."""
    hidden, weight, teacher_hidden, _, mask = fully_fused_inputs()
    config = make_config("jsd", "shift", "uniform")
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = fused_head_distillation_loss(h, w, teacher_hidden, mask, config,
                                           teacher_output_weight=w)
    got = torch.autograd.grad(loss, (h, w))
    expected = loss_and_head_grads(hidden, weight, teacher_hidden @ weight.t(), mask, config)
    assert_close(got[0], expected[1], 1e-12, "hidden grad")
    assert_close(got[1], expected[2], 1e-12, "weight grad")


def test_teacher_output_weight_of_the_wrong_shape_raises():
    hidden, weight, teacher_hidden, teacher_weight, mask = fully_fused_inputs()
    config = LoopDistillConfig()
    for bad in (teacher_weight[:-1], teacher_weight[:, :-1], teacher_weight[None]):
        with pytest.raises(ValueError, match=r"teacher_output_weight must be \[V/TP=24, h=8\]"):
            fused_head_distillation_loss(hidden, weight, teacher_hidden, mask, config,
                                         teacher_output_weight=bad)


def test_masked_tokens_change_nothing():
    student, teacher, mask = make_inputs(seed=7)
    config = make_config("jsd", "linear", "adaptive", top_k=None)
    loss, grad, metrics = loss_and_grad(cross_loop_distillation_loss, student, teacher, mask,
                                        config)
    masked = ~mask.bool()
    noisy_s, noisy_t = student.clone(), teacher.clone()
    noisy_s[:, masked] += 50 * torch.randn_like(noisy_s[:, masked])
    noisy_t[:, masked] -= 50 * torch.randn_like(noisy_t[:, masked])
    loss2, grad2, metrics2 = loss_and_grad(cross_loop_distillation_loss, noisy_s, noisy_t, mask,
                                           config)
    assert_close(loss2, loss, 1e-14, "loss")
    assert_close(grad2, grad, 1e-14, "grad")
    assert grad[:, masked].abs().max() == 0
    for name in metrics:
        assert_close(metrics2[name], metrics[name], 1e-14, name)


def test_empty_sequences_and_empty_batch_give_no_nan():
    student, teacher, _ = make_inputs()
    mask = torch.zeros(SEQ, BATCH)
    mask[3, 0] = 1
    loss, grad, _ = loss_and_grad(cross_loop_distillation_loss, student, teacher, mask,
                                  make_config("forward_kl", "shift", "uniform"))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss, grad, metrics = loss_and_grad(cross_loop_distillation_loss, student, teacher,
                                        torch.zeros(SEQ, BATCH),
                                        make_config("forward_kl", "shift", "adaptive"))
    assert loss == 0 and grad.abs().max() == 0
    assert torch.isfinite(metrics["loop_weights"]).all()


def test_metrics_and_global_normalizer():
    student, teacher, mask = make_inputs(seed=8)
    config = LoopDistillConfig.terminal_only(divergence="forward_kl", chunk_size=None)
    loss, metrics = cross_loop_distillation_loss(student, teacher, mask, config)
    assert metrics["loop_weights"].tolist() == [0.0, 1.0]
    assert_close(loss, metrics["divergence_per_loop"][-1], 1e-14)
    assert (metrics["student_entropy_per_loop"] > 0).all()
    log_p_t = torch.log_softmax(teacher[-1], -1)
    entropy = -(log_p_t.exp() * log_p_t).sum(-1)
    per_seq = (entropy * mask).sum(0) / mask.sum(0).clamp(min=1)
    assert_close(metrics["teacher_entropy_per_loop"][-1], per_seq[mask.sum(0) > 0].mean(), 1e-12)
    local = LossNormalizer.count([mask.t()])
    assert local.sequences == 3  # non-empty sequences here
    halved, _ = cross_loop_distillation_loss(student, teacher, mask, config,
                                             normalizer=LossNormalizer(local.tokens, 6))
    assert_close(halved, loss / 2, 1e-14)  # a step with 6 sequences in all


def test_backward_scales_with_the_incoming_gradient():
    student, teacher, mask = make_inputs()
    student.requires_grad_(True)
    loss, _ = cross_loop_distillation_loss(student, teacher, mask, LoopDistillConfig())
    (once,) = torch.autograd.grad(loss, student, retain_graph=True)
    (scaled,) = torch.autograd.grad(3 * loss, student)
    assert_close(scaled, 3 * once, 1e-14)


@pytest.mark.parametrize("fields,message", [
    (dict(divergence="kl"), "unknown divergence"),
    (dict(divergence="jsd", beta=0.0), "0 < beta < 1"),
    (dict(divergence="jsd", beta=1.0), "0 < beta < 1"),
    (dict(temperature=0.0), "temperature"),
    (dict(mapping="nearest"), "unknown loop mapping"),
    (dict(mapping="explicit", mapping_list=(3, 2)), "non-decreasing"),
    (dict(mapping="explicit", mapping_list=(1, 4)), "φ"),
    (dict(weighting="softmax"), "unknown loop weighting"),
    (dict(weighting="explicit", weights_list=(0.5, 0.6)), "sum to 1"),
    (dict(weighting="explicit", weights_list=(1.5, -0.5)), "non-negative"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=VOCAB + 1), "exceeds the vocabulary"),
    (dict(top_k_mode="drop"), "top_k_mode"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(aggregation="sum"), "aggregation"),
    (dict(nonfinite="ignore"), "nonfinite policy"),
])
def test_invalid_configs_raise(fields, message):
    student, teacher, mask = make_inputs()
    with pytest.raises(ValueError, match=message):
        cross_loop_distillation_loss(student, teacher, mask, LoopDistillConfig(**fields))


def test_invalid_shapes_raise():
    student, teacher, mask = make_inputs()
    with pytest.raises(ValueError, match="student_loops ≤ teacher_loops"):
        cross_loop_distillation_loss(teacher, student, mask, LoopDistillConfig())
    with pytest.raises(ValueError, match="seq, batch"):
        cross_loop_distillation_loss(student, teacher, mask[:-1], LoopDistillConfig())
    with pytest.raises(ValueError, match="vocab shard"):
        cross_loop_distillation_loss(student, teacher[..., :-1], mask, LoopDistillConfig())


def test_teacher_logits_of_only_the_mapped_loops_give_the_same_loss():
    from nemo_loop.losses import LoopDistillConfig, cross_loop_distillation_loss

    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 2, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 5, 2, 16, generator=gen, dtype=torch.float64)
    mask = torch.ones(5, 2, dtype=torch.float64)
    config = LoopDistillConfig(mapping="shift")  # (R, R̃) = (4, 2) → φ = [3, 4]
    full, _ = cross_loop_distillation_loss(student, teacher, mask, config)
    mapped, _ = cross_loop_distillation_loss(student, teacher[2:], mask, config,
                                             teacher_loop_ids=[3, 4], num_teacher_loops=4)
    assert torch.equal(full, mapped)
    with pytest.raises(ValueError, match="needs teacher loops"):
        cross_loop_distillation_loss(student, teacher[:2], mask, config,
                                     teacher_loop_ids=[1, 2], num_teacher_loops=4)
    with pytest.raises(ValueError, match="go together"):
        cross_loop_distillation_loss(student, teacher[2:], mask, config, teacher_loop_ids=[3, 4])


# ----------------------------------------------------------------------------- input guards
GUARDED_PATHS = ("plain", "chunked", "top_k", "sampled", "fused", "fully_fused")
HEAD_PATHS = ("fused", "fully_fused")  # the student input is hidden states (replicated over TP)
PATH_CONFIG = {"plain": dict(chunk_size=None), "chunked": dict(chunk_size=2),
               "top_k": dict(top_k=3), "sampled": {}, "fused": dict(chunk_size=2),
               "fully_fused": dict(chunk_size=2)}
# φ = [2, 3] for (R, R̃) = (3, 2); (4, 1) is sequence 1's only response token
POISON = [("student", 2, (3, 0), 1, float("nan")), ("teacher", 3, (2, 2), 20, float("inf")),
          ("teacher", 3, (4, 1), 1, float("-inf"))]
POISON_MESSAGE = "student loop 2: 1 token; teacher loop 3: 2 tokens"
# prompt / padding positions, and teacher loop 1, which φ never uses: may hold anything
HARMLESS = [("student", 1, (0, 0), 1, float("nan")), ("teacher", 2, (4, 2), 20, float("inf")),
            ("teacher", 1, (3, 0), 1, float("nan"))]


def guard_inputs(seed=11):
    student, teacher, mask = make_inputs(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return dict(student=student, teacher=teacher, mask=mask,
                hidden=torch.randn(STUDENT_LOOPS, SEQ, BATCH, HIDDEN, generator=gen,
                                   dtype=torch.float64),
                weight=torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64),
                token_ids=torch.randint(0, VOCAB, (SEQ, BATCH), generator=gen),
                teacher_hidden=torch.randn(TEACHER_LOOPS, SEQ, BATCH, HIDDEN, generator=gen,
                                           dtype=torch.float64),
                teacher_weight=torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64))


def poisoned(inputs, path, entries):
    """Copies of ``inputs`` with (side, 1-based loop, (s, b), vocab id, value) written in; on the
    fused paths a student entry poisons the hidden state, so every logit of that token, and on
    the fully fused path a teacher entry likewise poisons the teacher's readout."""
    inputs = {name: tensor.clone() for name, tensor in inputs.items()}
    for side, loop, (s, b), vocab_id, value in entries:
        if side == "teacher" and path == "fully_fused":
            inputs["teacher_hidden"][loop - 1, s, b, 0] = value
        elif side == "teacher":
            inputs["teacher"][loop - 1, s, b, vocab_id] = value
        elif path in HEAD_PATHS:
            inputs["hidden"][loop - 1, s, b, 0] = value
        else:
            inputs["student"][loop - 1, s, b, vocab_id] = value
    return inputs


def guarded_loss(path, inputs, mask=None, tp_group=None, vocab=slice(None), **overrides):
    """(loss, grad of the student input, metrics) on one loss path and vocabulary slice; the
    student input is the hidden states on the fused path (their gradient is not sliced)."""
    config = make_config("forward_kl", "linear", "uniform", **{**PATH_CONFIG[path], **overrides})
    mask = inputs["mask"] if mask is None else mask
    teacher = inputs["teacher"][..., vocab]
    if path == "fused":
        return loss_and_grad(lambda h: fused_head_distillation_loss(
            h, inputs["weight"][vocab], teacher, mask, config, tp_group), inputs["hidden"])
    if path == "fully_fused":  # the teacher's logits are formed chunk by chunk as well
        return loss_and_grad(lambda h: fused_head_distillation_loss(
            h, inputs["weight"][vocab], inputs["teacher_hidden"], mask, config, tp_group,
            teacher_output_weight=inputs["teacher_weight"][vocab]), inputs["hidden"])
    if path == "sampled":
        return loss_and_grad(sampled_token_distillation_loss, inputs["student"][..., vocab],
                             teacher, inputs["token_ids"], mask, config, tp_group)
    return loss_and_grad(cross_loop_distillation_loss, inputs["student"][..., vocab], teacher,
                         mask, config, tp_group)


def without_poisoned_tokens(mask):
    kept = mask.clone()
    for _, _, position, _, _ in POISON:
        kept[position] = 0
    return kept


@pytest.mark.parametrize("path", GUARDED_PATHS)
def test_nonfinite_logits_at_response_tokens_raise(path):
    inputs = poisoned(guard_inputs(), path, POISON + HARMLESS)
    with pytest.raises(ValueError, match=f"non-finite logits.*{POISON_MESSAGE}.*'skip'"):
        guarded_loss(path, inputs)


def test_nan_teacher_logit_in_top_k_forward_kl_raises_instead_of_a_wrong_loss():
    inputs = poisoned(guard_inputs(), "top_k", [("teacher", 3, (2, 0), 5, float("nan"))])
    with pytest.raises(ValueError, match="teacher loop 3: 1 token"):
        guarded_loss("top_k", inputs)


@pytest.mark.parametrize("path", GUARDED_PATHS)
def test_nonfinite_logits_at_masked_positions_change_nothing(path):
    clean = guard_inputs()
    loss, grad, metrics = guarded_loss(path, clean)
    loss2, grad2, metrics2 = guarded_loss(path, poisoned(clean, path, HARMLESS))
    assert torch.equal(loss2, loss) and torch.equal(grad2, grad)
    assert metrics2["nonfinite_tokens"] == 0


@pytest.mark.parametrize("path", GUARDED_PATHS)
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_skip_equals_masking_the_nonfinite_tokens_out(path, aggregation):
    inputs = poisoned(guard_inputs(), path, POISON + HARMLESS)
    loss, grad, metrics = guarded_loss(path, inputs, nonfinite="skip", aggregation=aggregation)
    # the independent computation: the same inputs with those tokens masked out by the caller
    expected, expected_grad, expected_metrics = guarded_loss(
        path, inputs, without_poisoned_tokens(inputs["mask"]), aggregation=aggregation)
    assert metrics.pop("nonfinite_tokens") == 3
    assert expected_metrics.pop("nonfinite_tokens") == 0
    assert_close(loss, expected, 1e-12, "loss")
    assert_close(grad, expected_grad, 1e-12, "grad")
    for name in expected_metrics:
        assert_close(metrics[name], expected_metrics[name], 1e-12, name)
    clean_loss, _, _ = guarded_loss(path, guard_inputs(), aggregation=aggregation)
    assert (loss - clean_loss).abs() > 1e-6  # the skipped tokens did count before


def test_sampled_token_ids_outside_the_vocabulary_raise():
    inputs = guard_inputs()
    for bad_id in (VOCAB, -1):
        inputs["token_ids"][2, 0] = bad_id
        with pytest.raises(ValueError, match=rf"token_ids must lie in \[0, {VOCAB}\).*"
                                             rf"1 do not, e\.g\. \[{bad_id}\]"):
            guarded_loss("sampled", inputs)
    # padding positions may hold anything, e.g. an ignore index
    inputs["token_ids"][2, 0] = 3
    loss, grad, _ = guarded_loss("sampled", inputs)
    inputs["token_ids"][0, 0] = -100
    loss2, grad2, _ = guarded_loss("sampled", inputs)
    assert torch.equal(loss2, loss) and torch.equal(grad2, grad)
