"""GRPO, k3 KL, RLTT and the fused token log-probs against hand computations (values and
gradients) on small tensors."""

import math

import pytest
import torch

from nemo_loop.losses.policy_gradient import (
    PolicyLossConfig,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    k3_kl,
    rltt_loop_weights,
    rltt_loss,
)
from nemo_loop.losses.token_logprobs import token_is_argmax, token_logprobs


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1])
    got = group_advantages(rewards, 4, eps=0.0)
    # group 1: mean ½, sample std √(4·¼/3); group 2: mean ¾, std √((3/16 + 9/16)/3) = ½
    first = 0.5 / math.sqrt(1 / 3)
    expected = [first, -first, -first, first, 0.5, 0.5, 0.5, -1.5]
    torch.testing.assert_close(got[:8], torch.tensor(expected), rtol=0, atol=1e-6)
    # a group whose rewards all agree carries no signal
    assert got[8:].abs().max() == 0
    with pytest.raises(ValueError, match=">= 2 samples"):
        group_advantages(rewards, 1)
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(rewards[:6], 4)


def test_clipped_surrogate_covers_the_four_ppo_cases():
    # (advantage, ratio): positive/negative advantage, ratio above/below the clip range
    cases = [(1.0, 1.5), (1.0, 0.5), (-1.0, 1.5), (-1.0, 0.5), (2.0, 1.1)]
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.2])
    logp = (old + torch.log(torch.tensor([r for _, r in cases]))).requires_grad_(True)
    advantages = torch.tensor([a for a, _ in cases])
    loss, clipped, ratio = clipped_surrogate(logp, old, advantages, 0.2, 0.2)
    # −min(ρA, clip(ρ)A):      A>0,ρ>1+ε: −1.2·A (clipped)   A>0,ρ<1−ε: −ρA
    #                          A<0,ρ>1+ε: −ρA                A<0,ρ<1−ε: −0.8·A (clipped)
    expected = [-1.2, -0.5, 1.5, 0.8, -2.2]
    torch.testing.assert_close(loss.detach(), torch.tensor(expected), rtol=0, atol=1e-6)
    assert clipped.tolist() == [True, False, False, True, False]
    torch.testing.assert_close(ratio, torch.tensor([r for _, r in cases]), rtol=0, atol=1e-6)
    loss.sum().backward()
    # d(−ρA)/d log p = −ρA where the unclipped branch is taken, 0 where clipped
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.5, 1.5, 0.0, -2.2]),
                               rtol=0, atol=1e-6)


def test_dual_clip_caps_negative_advantage_losses_by_hand():
    # (advantage, ratio): A<0 far above the clip range (capped at −c·A = 3), A<0 below the cap,
    # A>0 (dual-clip never applies), A<0 below 1 − ε (PPO's own clip)
    cases = [(-1.0, 5.0), (-1.0, 2.0), (1.0, 5.0), (-2.0, 0.5)]
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    logp = (old + torch.log(torch.tensor([r for _, r in cases]))).requires_grad_(True)
    advantages = torch.tensor([a for a, _ in cases])
    loss, bounded, _ = clipped_surrogate(logp, old, advantages, 0.2, 0.2, dual_clip=3.0)
    # PPO alone: 5, 2, −1.2, 1.6; dual-clip: min(5, 3) = 3, min(2, 3) = 2, −1.2, 1.6
    torch.testing.assert_close(loss.detach(), torch.tensor([3.0, 2.0, -1.2, 1.6]), rtol=0,
                               atol=1e-6)
    assert bounded.tolist() == [True, False, True, True]
    loss.sum().backward()  # the cap and the clips are constants: only −ρA of row 2 is live
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 2.0, 0.0, 0.0]), rtol=0, atol=1e-6)
    # off by default: DeepSeekMath's objective, −ρA = 5 for the first row
    plain, _, _ = clipped_surrogate(logp.detach(), old, advantages, 0.2, 0.2)
    assert plain[0].item() == pytest.approx(5.0)


def test_max_log_ratio_clamps_log_rho_before_the_exponential():
    old = torch.tensor([-30.0, -1.0])
    logp = torch.tensor([-5.0, -1.5], requires_grad=True)  # log ρ = 25 and −0.5
    advantages = torch.tensor([-1e-8, 1.0])
    loss, _, ratio = clipped_surrogate(logp, old, advantages, 0.2, 0.2, max_log_ratio=20.0)
    assert ratio[0].item() == pytest.approx(math.exp(20.0), rel=1e-6)
    assert loss[0].item() == pytest.approx(math.exp(20.0) * 1e-8, rel=1e-5)
    # the clamp binds on row 1 (no gradient there) and leaves row 2 alone: −ρA at ρ = e^−0.5,
    # outside [0.8, 1.2] with A > 0, so PPO's own clip does not apply (ρ·A < 0.8·A)
    loss.sum().backward()
    assert logp.grad[0].item() == 0.0
    assert logp.grad[1].item() == pytest.approx(-math.exp(-0.5), rel=1e-6)
    unclamped, _, _ = clipped_surrogate(logp.detach(), old, advantages, 0.2, 0.2)
    assert unclamped[0].item() == pytest.approx(math.exp(25.0) * 1e-8, rel=1e-5)


def test_k3_clamps_by_hand():
    logp = torch.tensor([-4.0, -2.0, -1.0], requires_grad=True)
    reference = torch.tensor([-1.0, -1.0, -30.0])  # δ = 3, 1, −29
    kl = k3_kl(logp, reference, max_log_ratio=20.0, clamp=10.0)
    # e^3 − 4 = 16.09 → 10; e − 2; δ = −29 → −20: e^−20 + 19 → 10
    torch.testing.assert_close(kl.detach(), torch.tensor([10.0, math.e - 2, 10.0]), rtol=1e-6,
                               atol=1e-6)
    kl.sum().backward()  # 1 − e^δ where no clamp binds
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 1 - math.e, 0.0]), rtol=1e-6,
                               atol=1e-6)
    # the input clamp alone: δ = −29 → −20, δ = 3 → 2 at ±2
    unclamped_output = k3_kl(logp.detach(), reference, max_log_ratio=20.0)
    assert unclamped_output[2].item() == pytest.approx(math.exp(-20) + 19)
    assert k3_kl(logp.detach()[:1], reference[:1], max_log_ratio=2.0).item() == \
        pytest.approx(math.exp(2) - 3)
    # the defaults: no dual-clip, no output clamp, δ and log ρ clamped at ±20 only
    config = PolicyLossConfig()
    assert (config.dual_clip, config.max_log_ratio, config.k3_clamp) == (None, 20.0, None)


def test_grpo_loss_applies_the_configured_clamps():
    logp = torch.tensor([[-4.0, -1.0]])
    old = torch.tensor([[-1.0, -1.0]])  # ρ = e^−3 for a negative advantage, ρ = 1
    reference = torch.tensor([[-1.0, -30.0]])
    weights = torch.tensor([[0.5, 0.5]])
    advantages = torch.tensor([-1.0, 2.0])
    config = PolicyLossConfig(kl_coef=0.1, dual_clip=3.0, k3_clamp=10.0)
    loss, metrics = grpo_loss(logp, old, advantages, weights, config, reference)
    surrogate = [-min(math.exp(-3) * -1, 0.8 * -1), -2.0]  # PPO's lower clip: 0.8
    kl = [math.exp(3) - 3 - 1, math.exp(-20) + 20 - 1]
    kl = [min(k, 10.0) for k in kl]
    expected = sum(0.5 * (s + 0.1 * k) for s, k in zip(surrogate, kl))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["kl"].item() == pytest.approx(0.5 * sum(kl), rel=1e-6)


def test_token_logprobs_at_a_temperature():
    torch.manual_seed(3)
    hidden = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(11, (6,))
    logp, entropy = token_logprobs(hidden, weight, ids, chunk_size=4, temperature=0.7)
    logp.sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    log_probs = torch.log_softmax(hidden @ weight.t() / 0.7, dim=-1)
    expected = log_probs.gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected.detach())
    torch.testing.assert_close(entropy, -(log_probs.exp() * log_probs).sum(-1).detach())
    expected.sum().backward()
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], weight.grad)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(hidden, weight, ids, temperature=0.0)


def test_k3_kl_value_and_gradient_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.3], requires_grad=True)
    reference = torch.tensor([-1.5, -2.0, -0.1])
    kl = k3_kl(logp, reference)
    deltas = [-0.5, 0.0, 0.2]
    torch.testing.assert_close(kl.detach(), torch.tensor([math.exp(d) - d - 1 for d in deltas]),
                               rtol=0, atol=1e-7)
    kl.sum().backward()  # d/d log p (e^δ − δ − 1) with δ = ref − log p: 1 − e^δ
    torch.testing.assert_close(logp.grad, torch.tensor([1 - math.exp(d) for d in deltas]),
                               rtol=0, atol=1e-7)


def test_grpo_loss_aggregates_surrogate_and_kl():
    torch.manual_seed(0)
    T, n = 3, 4
    logp = (-torch.rand(T, n) * 3).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(T, n)
    reference = logp.detach() + 0.2 * torch.randn(T, n)
    advantages = torch.tensor([1.0, -0.5, 0.0, 2.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.float32)
    weights = mask / (mask.sum(0) * n)  # sequence mean
    config = PolicyLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.05)
    loss, metrics = grpo_loss(logp, old, advantages, weights, config, reference)
    total, clipped = 0.0, 0.0
    for t in range(T):
        for i in range(n):
            if not mask[t, i]:
                continue
            lp, o, ref, a = logp[t, i].item(), old[t, i].item(), reference[t, i].item(), \
                advantages[i].item()
            rho = math.exp(lp - o)
            surrogate = -min(rho * a, min(max(rho, 0.8), 1.28) * a)
            kl = math.exp(ref - lp) - (ref - lp) - 1
            w = 1.0 / (mask[:, i].sum().item() * n)
            total += w * (surrogate + 0.05 * kl)
            clipped += w * (min(max(rho, 0.8), 1.28) * a < rho * a)
    assert loss.item() == pytest.approx(total, abs=1e-6)
    assert metrics["clip_fraction"].item() == pytest.approx(clipped, abs=1e-6)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, old, advantages, weights, config)


def test_token_logprobs_match_log_softmax_values_and_gradients():
    torch.manual_seed(1)
    hidden = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(11, (5, 3))
    upstream = torch.randn(5, 3, dtype=torch.float64)
    logp, entropy = token_logprobs(hidden, weight, ids, chunk_size=4)  # 15 tokens, 4 chunks
    (logp * upstream).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    log_probs = torch.log_softmax(hidden @ weight.t(), dim=-1)
    expected = log_probs.gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, expected.detach())
    torch.testing.assert_close(entropy, -(log_probs.exp() * log_probs).sum(-1).detach())
    (expected * upstream).sum().backward()
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], weight.grad)
    with pytest.raises(ValueError, match="token_ids must lie in"):
        token_logprobs(hidden, weight, ids + 11)


def test_token_is_argmax_matches_the_argmax_of_the_logits():
    torch.manual_seed(2)
    hidden, weight = torch.randn(6, 4, 8), torch.randn(11, 8)
    argmax = (hidden @ weight.t()).argmax(-1)
    others = (argmax + torch.randint(1, 11, argmax.shape)) % 11  # never the argmax
    ids = torch.where(torch.rand(argmax.shape) < 0.5, argmax, others)
    assert 0 < int((ids == argmax).sum()) < ids.numel()
    assert torch.equal(token_is_argmax(hidden, weight, ids, chunk_size=5), ids == argmax)


def _exit_probs_by_hand(gates: torch.Tensor) -> torch.Tensor:
    """p_r = σ(g_r)·∏_{j<r}(1 − σ(g_j)), the last loop takes the rest (plain products)."""
    sig = torch.sigmoid(gates)
    rows, survive = [], torch.ones_like(gates[0])
    for r in range(gates.shape[0]):
        rows.append(survive if r == gates.shape[0] - 1 else sig[r] * survive)
        survive = survive * (1 - sig[r])
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["uniform", "progressive", "exit_pdf", "learned"])
def test_rltt_loss_for_every_loop_weighting(kind):
    from nemo_loop.models.looplm.model import exit_distribution

    torch.manual_seed(2)
    R, T, n = 3, 4, 2
    per_loop = (-torch.rand(R, T, n, dtype=torch.float64) * 4).requires_grad_(True)
    gates = torch.randn(R, T, n, dtype=torch.float64, requires_grad=True)
    learned = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    reference = per_loop.detach()[-1] + 0.1 * torch.randn(T, n, dtype=torch.float64)
    advantages = torch.tensor([1.5, -0.7], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [0, 0]], dtype=torch.float64)
    weights = mask / (mask.sum(0) * n)
    omega = rltt_loop_weights(kind, R, gamma=2.0, exit_probs=exit_distribution(gates),
                              learned_logits=learned)
    loss, metrics = rltt_loss(per_loop, omega.double(), advantages, weights,
                              PolicyLossConfig(kl_coef=0.01), reference)
    loss.backward()

    # Independent: ω by hand, then −(1/G) Σ_i (1/|y_i|) Σ_j Σ_t ω_t·logp_t·Â_i + β·k3.
    hand_per_loop = per_loop.detach().clone().requires_grad_(True)
    hand_gates = gates.detach().clone().requires_grad_(True)
    hand_learned = learned.detach().clone().requires_grad_(True)
    if kind == "uniform":
        hand_omega = torch.full((R, 1, 1), 1 / 3, dtype=torch.float64)
    elif kind == "progressive":
        hand_omega = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64).view(R, 1, 1) / 14
    elif kind == "exit_pdf":
        hand_omega = _exit_probs_by_hand(hand_gates)
    else:
        e = torch.exp(hand_learned)
        hand_omega = (e / e.sum()).view(R, 1, 1)
    expected = 0.0
    for i in range(n):
        length = int(mask[:, i].sum())
        for j in range(length):
            mixed = sum(hand_omega[t].expand(T, n)[j, i] * hand_per_loop[t, j, i]
                        for t in range(R))
            delta = reference[j, i] - hand_per_loop[-1, j, i]
            kl = torch.exp(delta) - delta - 1
            expected = expected + (-advantages[i] * mixed + 0.01 * kl) / (length * n)
    expected.backward()
    # The model's exit distribution is computed in fp32, everything else here in fp64.
    tolerance = dict(rtol=1e-5, atol=1e-6) if kind == "exit_pdf" else {}
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6 if tolerance else 1e-12)
    torch.testing.assert_close(per_loop.grad, hand_per_loop.grad, **tolerance)
    if kind == "exit_pdf":  # the policy gradient reaches the exit gate
        assert gates.grad.abs().max() > 1e-3
        torch.testing.assert_close(gates.grad, hand_gates.grad, **tolerance)
    else:
        assert gates.grad is None
    if kind == "learned":
        torch.testing.assert_close(learned.grad, hand_learned.grad)
        assert learned.grad.abs().max() > 1e-4
    assert metrics["loop_weights"].shape == (R,)


def test_unknown_loop_weighting_is_named():
    with pytest.raises(ValueError, match="unknown RLTT loop weighting 'zigzag'"):
        rltt_loop_weights("zigzag", 2)


@pytest.mark.parametrize("field, value, message", [
    ("clip_low", -0.1, "clip_low"), ("kl_coef", -1.0, "kl_coef"),
    ("aggregation", "median", "aggregation"), ("clip_low", 1.0, "clip_low must be < 1")])
def test_bad_policy_loss_config(field, value, message):
    config = PolicyLossConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        config.validate()


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_the_ratio_compares_the_distribution_the_engine_sampled_from(megatron_single_process,
                                                                      temperature):
    """π_old is the engine's log-prob under its sampling distribution; GRPO's π_θ (same weights)
    scores the same tokens at the same temperature: ρ = 1, not e^{log p_T − log p_1}."""
    from nemo_loop.algorithms.grpo import GRPOConfig, Objective
    from nemo_loop.algorithms.rollouts import RolloutConfig, generate_rollouts
    from nemo_loop.config import CONF_DIR, read_section
    from nemo_loop.generation.native import NativeLoopEngine
    from nemo_loop.models.looplm.config import LoopModelConfig
    from nemo_loop.models.looplm.model import build_loop_model
    from nemo_loop.tasks import TaskConfig, build_task

    torch.manual_seed(0)
    model = build_loop_model(read_section(CONF_DIR / "model" / "tiny.yaml", LoopModelConfig)
                             .transformer_config()).eval()
    task = build_task(TaskConfig(name="shell_game"))
    tokenizer = task.tokenizer()
    rollout = RolloutConfig(student_loops=2, samples_per_prompt=2, max_new_tokens=5,
                            temperature=temperature)
    batch = generate_rollouts(NativeLoopEngine(model), task, tokenizer,
                              task.heldout_problems("train", 3), rollout, seed=3)
    micro_batch = batch.micro_batch(list(range(len(batch))), tokenizer.pad_id)
    with torch.no_grad():
        output = model(micro_batch["input_ids"], micro_batch["position_ids"],
                       micro_batch["attention_mask"], num_loops=2, logit_loops=[2],
                       compute_logits=False)
        logp, _ = Objective(GRPOConfig(rollout=rollout), model).logprobs(output.readouts[-1],
                                                                          micro_batch)
    tokens = micro_batch["loss_mask"].t() > 0
    assert tokens.sum() > 6
    torch.testing.assert_close(logp[tokens], micro_batch["old_logprobs"][tokens], rtol=0,
                               atol=1e-5)
    # the temperature-1 log-probs (the old π_θ) are another distribution
    at_one, _ = token_logprobs(output.readouts[-1, micro_batch["response_window"]],
                               model.output_weight(), micro_batch["token_ids"])
    assert (at_one[tokens] - micro_batch["old_logprobs"][tokens]).abs().max() > 1e-2
