"""The SFT loss (``nemo_loop.losses.supervised``) against a hand computation on small tensors."""

import math

import pytest
import torch

from nemo_loop.losses.supervised import logit_loops_for, supervised_loop_loss
from nemo_loop.models.looplm.model import LoopOutput

LOOPS, SEQ, BATCH, VOCAB, BETA = 3, 4, 2, 5, 0.1


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(LOOPS, SEQ, BATCH, VOCAB, generator=generator, dtype=torch.float64)
    exit_logits = torch.randn(LOOPS, SEQ, BATCH, generator=generator, dtype=torch.float64)
    labels = torch.randint(VOCAB, (BATCH, SEQ), generator=generator)
    weights = torch.rand(BATCH, SEQ, generator=generator, dtype=torch.float64)
    weights[0, :2] = 0.0  # prompt positions
    weights[1, -1] = 0.0  # past the end of the response
    return logits.requires_grad_(), exit_logits.requires_grad_(), labels, weights


def _hand_loss(logits, exit_logits, labels, weights, kind):
    """Token by token, scalar by scalar: CE_r = logsumexp(z) − z_y; p_r = σ(g_r)∏_{j<r}(1−σ(g_j)),
    the last loop taking what is left; ℓ = Σ_r p_r CE_r − β Σ_r −p_r log p_r."""
    total = 0.0
    for s in range(SEQ):
        for b in range(BATCH):
            y = int(labels[b, s])
            ce = [torch.logsumexp(logits[r, s, b], 0) - logits[r, s, b, y] for r in range(LOOPS)]
            if kind == "final_loop":
                token = ce[-1]
            else:
                survive, probs = 1.0, []
                for r in range(LOOPS):
                    exit_here = torch.sigmoid(exit_logits[r, s, b])
                    probs.append(survive * exit_here if r < LOOPS - 1 else survive)
                    survive = survive * (1 - exit_here)
                entropy = -sum(p * torch.log(p) for p in probs)
                token = sum(p * c for p, c in zip(probs, ce)) - BETA * entropy
            total = total + weights[b, s] * token
    return total


@pytest.mark.parametrize("kind", ["ouro", "final_loop"])
def test_supervised_loss_matches_the_hand_computation(megatron_single_process, kind):
    logits, exit_logits, labels, weights = _inputs()
    loops = logit_loops_for(kind, LOOPS)
    output = LoopOutput(loops=loops, readouts=torch.zeros(len(loops), SEQ, BATCH, 1),
                        logits=logits[[r - 1 for r in loops]], exit_logits=exit_logits)
    loss, metrics = supervised_loop_loss(output, labels, weights, kind, BETA)
    grads = torch.autograd.grad(loss, (logits, exit_logits), allow_unused=True)

    fresh_logits, fresh_exit = logits.detach().clone().requires_grad_(), \
        exit_logits.detach().clone().requires_grad_()
    expected = _hand_loss(fresh_logits, fresh_exit, labels, weights, kind)
    expected_grads = torch.autograd.grad(expected, (fresh_logits, fresh_exit), allow_unused=True)
    # The loss computes cross-entropy and exit probabilities in fp32; the hand version in fp64.
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6)
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-5, atol=1e-7)
    if kind == "ouro":
        torch.testing.assert_close(grads[1], expected_grads[1], rtol=1e-5, atol=1e-7)
        assert grads[1].abs().sum() > 0  # the exit gate learns
        assert len(metrics["ce_per_loop"]) == LOOPS
    else:
        assert grads[1] is None  # final-loop CE does not touch the exit gate
        # ∂/∂z of w·CE is w·(softmax(z) − onehot(y)), only at the last loop
        analytic = torch.softmax(logits.detach()[-1], -1) - torch.nn.functional.one_hot(
            labels.t(), VOCAB)
        analytic = analytic * weights.t()[..., None]
        torch.testing.assert_close(grads[0][-1], analytic, rtol=1e-5, atol=1e-7)
        assert grads[0][:-1].abs().sum() == 0
        assert len(metrics["ce_per_loop"]) == 1


def test_final_loop_needs_the_last_loop():
    logits, exit_logits, labels, weights = _inputs()
    output = LoopOutput(loops=[1], readouts=torch.zeros(1, SEQ, BATCH, 1), logits=logits[:1],
                        exit_logits=exit_logits)
    with pytest.raises(ValueError, match="final_loop needs the logits of loop 3"):
        supervised_loop_loss(output, labels, weights, "final_loop")
    with pytest.raises(ValueError, match="unknown supervised loss kind 'ce'"):
        supervised_loop_loss(output, labels, weights, "ce")
