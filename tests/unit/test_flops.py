"""FLOPs accounting: a hand count on a tiny config, torch's FLOP counter on the real model,
generation = prefill + decoding steps, and each algorithm's step against the formulas."""

from types import SimpleNamespace

import pytest
import torch

from nemo_loop.models.looplm.config import LoopModelConfig
from nemo_loop.utils.flops import (
    LoopShape,
    forward_flops,
    generation_flops,
    inference_flops_per_token,
    throughput,
    training_flops,
)

# h = 8, one layer, 2 heads of 4 dims sharing 1 K/V group, SwiGLU width 4, 10 words, R = 2.
HAND = LoopShape(hidden=8, layers=1, heads=2, query_groups=1, ffn=4, vocab=10, num_loops=2)


def test_hand_count_of_one_forward_on_a_tiny_config():
    # One token through the layer: Q 2·8·8 = 128, K and V 2·8·(2·4) = 128, output 2·8·8 = 128,
    # SwiGLU gate + up + down 3·2·8·4 = 192: 576. A (query, key) pair: QKᵀ and A·V, 2 heads of
    # 4 dims: 2·2·2·4 = 32. Exit gate 2·8 = 16 per token and loop; head 2·8·10 = 160 a readout.
    assert HAND.layer_flops_per_token() == 576
    assert HAND.attention_flops_per_pair() == 32
    # 3 tokens (causal pairs 1 + 2 + 3 = 6), 2 loops, the head on 2 readouts:
    # 2 · (3·576 + 6·32 + 3·16) + 2·160 = 2 · 1968 + 320 = 4256.
    assert forward_flops(HAND, 3, loops=2, readouts=2) == 4256
    assert training_flops(HAND, 3, loops=2, readouts=2) == 3 * 4256
    # With 4 cached keys the 3 new queries see 5, 6, 7 keys: 18 pairs.
    assert forward_flops(HAND, 3, loops=1, past_tokens=4) == 3 * 576 + 18 * 32 + 3 * 16
    # One decoding step at 2 loops after 5 tokens: 2 · (576 + 6·32 + 16) + 160.
    assert inference_flops_per_token(HAND, 2, context_tokens=5) == 2 * (576 + 192 + 16) + 160
    with pytest.raises(ValueError, match="must be >= 0"):
        forward_flops(HAND, -1, loops=1)


@pytest.mark.parametrize("prompt, generated, loops", [(5, 1, 1), (5, 4, 2), (1, 7, 3)])
def test_generation_is_a_prefill_plus_one_decoding_step_per_further_token(prompt, generated,
                                                                          loops):
    prefill = forward_flops(HAND, prompt, loops, readouts=1)
    steps = sum(inference_flops_per_token(HAND, loops, context_tokens=prompt + j)
                for j in range(generated - 1))
    assert generation_flops(HAND, prompt, generated, loops) == prefill + steps
    assert generation_flops(HAND, prompt, 0, loops) == 0


def test_throughput_and_mfu():
    metrics = throughput(8e12, seconds=2.0, devices=4, peak_flops_per_s=2e12)
    assert metrics == {"achieved_flops_per_s_per_device": 1e12, "mfu": 0.5}
    assert "mfu" not in throughput(1.0, 1.0, 1, None)


def test_formula_matches_torchs_flop_counter_on_the_real_model(megatron_single_process):
    """torch counts every matmul the model runs. Megatron's local DotProductAttention computes
    all s² (query, key) products and masks the upper triangle, so the counter sees
    s² − s(s+1)/2 pairs per layer and loop more than the causal count; everything else must
    agree exactly, backward included."""
    from torch.utils.flop_counter import FlopCounterMode

    from nemo_loop.models.looplm.model import build_loop_model

    config = LoopModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48,
                             num_attention_heads=4, num_query_groups=2, vocab_size=40,
                             max_sequence_length=16, num_loops=3, attention_backend="dot_product")
    torch.manual_seed(0)
    model = build_loop_model(config.transformer_config())
    shape, batch, seq, loops, logit_loops = LoopShape.of(config), 2, 7, 3, [1, 3]
    tokens = torch.randint(0, 40, (batch, seq), generator=torch.Generator().manual_seed(0))
    masked_pairs = seq * seq - seq * (seq + 1) // 2
    extra = loops * shape.layers * masked_pairs * shape.attention_flops_per_pair()
    expected = batch * (forward_flops(shape, seq, loops, readouts=seq * len(logit_loops))
                        + extra)
    with FlopCounterMode(display=False) as counter:
        output = model(tokens, num_loops=loops, logit_loops=logit_loops)
    assert counter.get_total_flops() == expected
    with FlopCounterMode(display=False) as counter:
        output = model(tokens, num_loops=loops, logit_loops=logit_loops)
        (output.logits.float().square().mean() + output.exit_logits.sum()).backward()
    assert counter.get_total_flops() == 3 * expected


def _rollout(prompt: int, response: int):
    return SimpleNamespace(prompt=[1] * prompt, response=[2] * response)


def _config(**trainer):
    model = SimpleNamespace(hidden_size=8, num_layers=1, num_attention_heads=2,
                            num_query_groups=1, ffn_hidden_size=4, vocab_size=10, num_loops=4)
    trainer = {"peak_flops_per_s": None, "updates_per_batch": 1, **trainer}
    return SimpleNamespace(model=model, rollout=SimpleNamespace(student_loops=2),
                           trainer=SimpleNamespace(**trainer))


def test_algorithm_steps_add_up_their_phases(megatron_single_process):
    from nemo_loop.algorithms import step_flops

    shape = LoopShape(hidden=8, layers=1, heads=2, query_groups=1, ffn=4, vocab=10, num_loops=4)
    rollouts = SimpleNamespace(rollouts=[_rollout(5, 3), _rollout(4, 1)])
    generate = generation_flops(shape, 5, 3, 2) + generation_flops(shape, 4, 1, 2)

    # LLOPSD: teacher prompts of 7 and 6 tokens, mapped teacher loops 3 and 4.
    metrics = step_flops.llopsd(_config(), rollouts, [[0] * 7, [0] * 6], [3, 4], seconds=2.0)
    teacher = forward_flops(shape, 10, 4, readouts=3 * 2) + forward_flops(shape, 7, 4,
                                                                           readouts=1 * 2)
    student = training_flops(shape, 8, 2, readouts=3 * 2) + training_flops(shape, 5, 2,
                                                                           readouts=1 * 2)
    assert (metrics["flops_generate"], metrics["flops_teacher"], metrics["flops_student"]) == (
        generate, teacher, student)
    assert metrics["flops"] == generate + teacher + student
    assert metrics["achieved_flops_per_s_per_device"] == metrics["flops"] / 2.0
    assert "mfu" not in metrics

    # GRPO with a reference, two updates per batch, the loss reading loop 2 only; a peak.
    config = _config(peak_flops_per_s=1e6, updates_per_batch=2)
    metrics = step_flops.policy(config, rollouts, [2], uses_reference=True, seconds=1.0)
    reference = forward_flops(shape, 8, 2, readouts=3) + forward_flops(shape, 5, 2, readouts=1)
    update = training_flops(shape, 8, 2, readouts=3) + training_flops(shape, 5, 2, readouts=1)
    assert metrics["flops"] == generate + reference + 2 * update
    assert metrics["mfu"] == pytest.approx(metrics["flops"] / 1e6)

    # Teacher-forced rows of 6 and 3 input tokens with 2 and 1 targets: SFT reads the head at
    # 2 loops on the targets, pretraining at every loop on every token.
    micro_batch = {"row_lengths": torch.tensor([6, 3]),
                   "loss_mask": torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1]])}
    sft = step_flops.teacher_forced(_config(), [micro_batch], 2, 2, seconds=1.0)
    assert sft["flops"] == training_flops(shape, 6, 2, 4) + training_flops(shape, 3, 2, 2)
    pretrain = step_flops.teacher_forced(_config(), [micro_batch], 4, None, seconds=1.0)
    assert pretrain["flops"] == training_flops(shape, 6, 4, 24) + training_flops(shape, 3, 4, 12)


def test_teacher_forced_batches_carry_their_real_row_lengths():
    from nemo_loop.data.sequences import teacher_forced_batch

    batch = teacher_forced_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert batch["row_lengths"].tolist() == [4, 3]
    assert batch["input_ids"].shape[1] == 5  # padded columns are not counted
