"""Ouro's Stage II gate loss against its definition, and that only the gates get a gradient."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_loop.losses.exit_gate import exit_gate_loss
from nemo_loop.models.looplm.model import LoopOutput


def _output(num_loops=3, seq=4, batch=2, vocab=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_loops, seq, batch, vocab, generator=gen)
    gates = torch.randn(num_loops, seq, batch, generator=gen).requires_grad_()
    labels = torch.randint(vocab, (batch, seq), generator=gen)
    return LoopOutput(list(range(1, num_loops + 1)), torch.zeros(num_loops, seq, batch, 1),
                      logits, gates), labels


def test_loss_is_the_bce_toward_the_next_loops_improvement(megatron_single_process):
    output, labels = _output()
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.float)
    loss, metrics = exit_gate_loss(output, labels, mask, slope=50.0, margin=0.005)
    total, count = 0.0, 0
    for s in range(4):
        for b in range(2):
            if not mask[b, s]:
                continue
            ce = [-torch.log_softmax(output.logits[r, s, b], -1)[labels[b, s]].item()
                  for r in range(3)]
            for r in range(2):  # the gates after loops 1 and 2; loop 3 always exits
                keep_going = 1 / (1 + math.exp(-50.0 * (max(0.0, ce[r] - ce[r + 1]) - 0.005)))
                exit_prob = torch.sigmoid(output.exit_logits[r, s, b]).item()
                total -= (1 - keep_going) * math.log(exit_prob) \
                    + keep_going * math.log(1 - exit_prob)
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert len(metrics["continue_target_per_loop"]) == 2
    loss.backward()
    assert output.exit_logits.grad[2].abs().sum() == 0  # the last gate is not trained
    assert output.exit_logits.grad[:2].abs().sum() > 0


def test_loss_needs_every_loops_logits(megatron_single_process):
    output, labels = _output()
    partial = LoopOutput([3], output.readouts[2:], output.logits[2:], output.exit_logits)
    with pytest.raises(ValueError, match="logits of every loop"):
        exit_gate_loss(partial, labels, torch.ones(2, 4))
