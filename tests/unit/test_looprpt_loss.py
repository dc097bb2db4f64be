"""LoopRPT's loss terms against hand computations: explicit numbers for hard tokens, t_ref, b_s,
λ_s, rewards and exit draws; and every term of the loss (with its gradient) against a
token-by-token implementation written from the paper's formulas on small seeded tensors."""

import math

import pytest
import torch

from nemo_loop.losses.looprpt import (
    LoopRPTLossConfig,
    gold_is_argmax,
    hard_token_mask,
    loop_rewards,
    looprpt_loss,
    sample_exit_loops,
    teacher_reference,
)


def test_hard_tokens_are_the_top_share_of_each_sequence_by_entropy():
    entropy = torch.tensor([[0.1, 5.0], [0.9, 4.0], [0.5, 3.0], [0.7, 9.0], [0.3, 8.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0], [1, 0]], dtype=torch.float)
    # column 0: 5 positions → ⌈0.2·5⌉ = 1 → position 1 (0.9); ratio 0.4 → 2: positions 1, 3
    # column 1: 3 valid positions → ⌈0.6⌉ = 1 → position 0 (5.0); masked 9.0 and 8.0 never count
    hard = hard_token_mask(entropy, mask, 0.2)
    assert hard.tolist() == [[False, True], [True, False], [False, False], [False, False],
                             [False, False]]
    hard = hard_token_mask(entropy, mask, 0.4)
    assert hard[:, 0].nonzero().flatten().tolist() == [1, 3]
    assert hard[:, 1].nonzero().flatten().tolist() == [0, 1]  # ⌈1.2⌉ = 2
    # 0.7·10 is 7.000000000000001 in floating point: still 7 tokens, not 8
    assert hard_token_mask(torch.arange(10.0)[:, None], torch.ones(10, 1), 0.7).sum() == 7
    assert not hard_token_mask(entropy, torch.zeros(5, 2), 0.2).any()


def _one_token(values):
    return torch.tensor(values, dtype=torch.float64)[:, None, None]


def test_teacher_reference_by_hand():
    # exit distribution 0.2, 0.25, 0.35, 0.2: CDF 0.2, 0.45, 0.8 → t_ref = loop 3 (index 2)
    exit_probs = _one_token([0.2, 0.25, 0.35, 0.2])
    gold = _one_token([-3.0, -2.0, -1.5, -1.0])
    token_entropy = _one_token([4.0, 3.0, 2.0, 1.0])
    config = LoopRPTLossConfig()
    ref = teacher_reference(gold, token_entropy, exit_probs, torch.ones(1, 1), config, 64)
    assert ref.exit_loop.item() == 2 and ref.baseline.item() == -1.5
    entropy = -sum(p * math.log(p) for p in (0.2, 0.25, 0.35, 0.2))
    difficulty = entropy / math.log(4)
    assert ref.time_penalty.item() == pytest.approx(0.02 * (1 + 0.5 * (1 - difficulty)))
    # the authors' variant: entropy of the teacher's token distribution at t_ref over log V
    config.difficulty = "token_entropy"
    ref = teacher_reference(gold, token_entropy, exit_probs, torch.ones(1, 1), config, 64)
    assert ref.time_penalty.item() == pytest.approx(0.02 * (1 + 0.5 * (1 - 2.0 / math.log(64))))
    # threshold never reached (all mass on the last loop rounds below it): the last loop
    config.exit_threshold = 1.0
    never = _one_token([0.3, 0.3, 0.3, 0.0999])
    assert teacher_reference(gold, token_entropy, never, torch.ones(1, 1), config,
                             64).exit_loop.item() == 3


def test_rewards_and_exit_draws_by_hand():
    logp = _one_token([-2.0, -1.0, -0.5])
    rewards = loop_rewards(logp, torch.tensor([[-1.0]], dtype=torch.float64),
                           torch.tensor([[0.1]], dtype=torch.float64), torch.tensor([[1]]))
    # r_t = logp_t − b − λ(t − t_ref): −2+1+0.1, −1+1−0, −0.5+1−0.1
    assert rewards.flatten().tolist() == pytest.approx([-0.9, 0.0, 0.4])
    probs = torch.tensor([0.2, 0.5, 0.3])[:, None, None].expand(3, 1, 4)
    draws = sample_exit_loops(probs, torch.tensor([[0.1, 0.2, 0.69, 0.71]]))
    assert draws.tolist() == [[0, 0, 1, 2]]


# ----- the whole loss against a token-by-token implementation -----

R, S, B, G = 3, 5, 2, 3


def _exit_probs_by_hand(gates):
    """π_t = σ(g_t)·∏_{j<t}(1 − σ(g_j)); the last loop takes what is left."""
    probs, left = [], 1.0
    for t, g in enumerate(gates):
        if t == len(gates) - 1:
            probs.append(left)
        else:
            probs.append(torch.sigmoid(g) * left)
            left = left * (1 - torch.sigmoid(g))
    return probs


def _normalised(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((float(v) - float(mean)) ** 2 for v in values) / (len(values) - 1))
    return [(v - mean) / (std + 1e-6) for v in values]


def _reference_loss(clean_logp, noisy_logp, clean_gates, noisy_gates, teacher_logp,
                    teacher_exit, teacher_final_entropy, loss_mask, uniforms, cfg):
    """Every term written per token from the formulas, with Python loops."""
    terms = dict(backbone=0.0, entropy=0.0, policy=0.0, kl=0.0)
    hard_count = 0
    for i in range(B):
        valid = [s for s in range(S) if loss_mask[s, i] > 0]
        k = math.ceil(round(len(valid) * cfg.hard_token_ratio, 6))
        hard = sorted(valid, key=lambda s: (-float(teacher_final_entropy[s, i]), s))[:k]
        for s in hard:
            hard_count += 1
            cdf, t_ref = 0.0, R - 1
            for t in range(R):
                cdf += float(teacher_exit[t, s, i])
                if cdf >= cfg.exit_threshold:
                    t_ref = t
                    break
            baseline = teacher_logp[t_ref, s, i]
            exit_entropy = -sum(float(p) * math.log(float(p)) for p in teacher_exit[:, s, i])
            lam = cfg.lambda_base * (1 + cfg.lambda_difficulty_scale
                                     * (1 - exit_entropy / math.log(R)))
            rewards = [clean_logp[t, s, i].detach() - baseline - lam * (t - t_ref)
                       for t in range(R)]
            advantages = _normalised(rewards)
            pi = _exit_probs_by_hand(clean_gates[:, s, i])
            terms["backbone"] += sum(-clean_logp[t, s, i] * pi[t].detach()
                                     * (1 + max(float(advantages[t]), 0.0)) for t in range(R))
            terms["entropy"] += -sum(p * torch.log(p) for p in pi)
            returns, chosen = [], []
            for g in range(G):
                column = g * B + i
                pi_g = _exit_probs_by_hand(noisy_gates[:, s, column])
                cdf, exit_t = 0.0, R - 1
                for t in range(R):
                    cdf += float(pi_g[t])
                    if cdf >= float(uniforms[s, column]):
                        exit_t = t
                        break
                returns.append(float(noisy_logp[exit_t, s, column]) - float(baseline)
                               - lam * (exit_t - t_ref))
                chosen.append(torch.log(pi_g[exit_t]))
                for t in range(R):
                    delta = teacher_logp[t, s, i] - noisy_logp[t, s, column]
                    terms["kl"] += torch.clamp(torch.exp(delta) - delta - 1, max=cfg.kl_clamp)
            for a, log_pi in zip(_normalised(returns), chosen):
                terms["policy"] += -a * log_pi
    terms["backbone"] /= hard_count
    terms["entropy"] /= hard_count
    terms["policy"] /= hard_count * G
    terms["kl"] /= hard_count * G
    return terms


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64))

    student_logp = (-randn(R, S, (1 + G) * B).abs() - 0.1).requires_grad_()
    gates = randn(R, S, (1 + G) * B, scale=1.5).requires_grad_()
    teacher_logp = -randn(R, S, B).abs() - 0.1
    teacher_exit = torch.softmax(randn(R, S, B), dim=0)
    final_entropy = randn(S, B).abs()
    loss_mask = torch.ones(S, B, dtype=torch.float64)
    loss_mask[4, 1] = 0
    uniforms = torch.rand(S, G * B, generator=generator, dtype=torch.float64)
    return student_logp, gates, teacher_logp, teacher_exit, final_entropy, loss_mask, uniforms


TERMS = {  # term → the coefficients that isolate it
    "backbone": dict(policy_coef=0, backbone_coef=1, gate_entropy_coef=0, kl_coef=0),
    "policy": dict(policy_coef=1, backbone_coef=0, gate_entropy_coef=0, kl_coef=0),
    "entropy": dict(policy_coef=0, backbone_coef=0, gate_entropy_coef=1, kl_coef=0),
    "kl": dict(policy_coef=0, backbone_coef=0, gate_entropy_coef=0, kl_coef=1),
}


@pytest.mark.parametrize("term", sorted(TERMS))
def test_each_term_and_its_gradient_match_the_token_by_token_formulas(term):
    from nemo_loop.models.looplm.model import exit_log_distribution

    cfg = LoopRPTLossConfig(hard_token_ratio=0.4, **TERMS[term])
    student_logp, gates, teacher_logp, teacher_exit, final_entropy, loss_mask, uniforms = \
        _inputs()
    token_entropy = torch.cat([torch.zeros(R - 1, S, B, dtype=torch.float64),
                               final_entropy[None]])
    reference = teacher_reference(teacher_logp, token_entropy, teacher_exit, loss_mask, cfg,
                                  vocab_size=64)
    assert reference.hard.sum() == 2 + 2  # ⌈0.4·5⌉ = 2 and ⌈0.4·4⌉ = 2
    loss, metrics = looprpt_loss(student_logp, exit_log_distribution(gates).double(),
                                 reference, uniforms, loss_mask, cfg)
    got_grads = torch.autograd.grad(loss, [student_logp, gates])

    expected = _reference_loss(student_logp[..., :B], student_logp[..., B:], gates[..., :B],
                               gates[..., B:], teacher_logp, teacher_exit, final_entropy,
                               loss_mask, uniforms, cfg)
    sign = -1.0 if term == "entropy" else 1.0  # an entropy *bonus*: minus in the loss
    expected_loss = sign * expected[term]
    assert loss.item() == pytest.approx(float(expected_loss), rel=1e-5, abs=1e-7)
    metric = {"backbone": "backbone_loss", "policy": "policy_loss", "entropy": "gate_entropy",
              "kl": "kl"}[term]
    assert metrics[metric].item() == pytest.approx(float(expected[term]), rel=1e-5, abs=1e-7)
    want_grads = torch.autograd.grad(expected_loss, [student_logp, gates], allow_unused=True)
    for got, want in zip(got_grads, want_grads):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in got_grads)  # the term has a gradient


def test_the_loss_is_the_weighted_sum_of_its_terms():
    student_logp, gates, teacher_logp, teacher_exit, final_entropy, loss_mask, uniforms = \
        _inputs(seed=3)
    from nemo_loop.models.looplm.model import exit_log_distribution

    token_entropy = final_entropy[None].expand(R, S, B)
    cfg = LoopRPTLossConfig(policy_coef=0.7, backbone_coef=1.3, gate_entropy_coef=0.2,
                            kl_coef=0.4)
    reference = teacher_reference(teacher_logp, token_entropy, teacher_exit, loss_mask, cfg, 64)
    loss, m = looprpt_loss(student_logp, exit_log_distribution(gates).double(), reference,
                           uniforms, loss_mask, cfg)
    combined = (0.7 * m["policy_loss"] + 1.3 * m["backbone_loss"] - 0.2 * m["gate_entropy"]
                + 0.4 * m["kl"])
    assert loss.item() == pytest.approx(combined.item(), rel=1e-9)
    assert m["hard_tokens"].item() == 2  # ⌈0.2·5⌉ = 1 and ⌈0.2·4⌉ = 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="num_loops must be >= 2"):
        LoopRPTLossConfig().validate(1)
    with pytest.raises(ValueError, match="hard_token_ratio"):
        LoopRPTLossConfig(hard_token_ratio=0.0).validate(4)
    with pytest.raises(ValueError, match="difficulty"):
        LoopRPTLossConfig(difficulty="loss").validate(4)
    with pytest.raises(ValueError, match="kl_coef"):
        LoopRPTLossConfig(kl_coef=-1).validate(4)


def test_gold_is_argmax_single_rank():
    logits = torch.tensor([[[0.1, 2.0, 0.3], [5.0, 5.0, 1.0]]])  # [1, 2, V=3]
    targets = torch.tensor([[1, 1]])
    # row 2 is a tie between ids 0 and 1: counted as correct
    assert gold_is_argmax(logits, targets).tolist() == [[True, True]]
    assert gold_is_argmax(logits, torch.tensor([[0, 2]])).tolist() == [[False, False]]
