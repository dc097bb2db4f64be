"""OISD's logit-lens and attention terms against hand computations, negative advantages
included; the attention probe's gradients through the loop pipeline; RLTT's exit_pdf gradient
reaching the model's exit gate."""

import math

import pytest
import torch

from nemo_loop.losses.oisd import (
    AttentionSamples,
    OISDLossConfig,
    attention_jsd,
    logit_lens_jsd,
    sample_attention_steps,
    sampled_key_columns,
)


def _jsd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    m = (p + q) / 2
    kl = lambda a, b: sum(a[i] * (math.log(a[i]) - math.log(b[i])) for i in range(len(a))
                          if a[i] > 0)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_logit_lens_jsd_by_hand_with_negative_weights():
    torch.manual_seed(0)
    k, T, b, h, V, tau = 2, 3, 2, 6, 7, 1.5
    hidden = torch.randn(k, T, b, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, h, dtype=torch.float64, requires_grad=True)
    final = torch.randn(1, T, b, V, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=torch.float64)
    # clipped advantages +0.8 and −1.0 times sequence-mean weights
    token_weights = mask / (mask.sum(0) * b) * torch.tensor([0.8, -1.0], dtype=torch.float64)
    value, per_loop = logit_lens_jsd(hidden, weight, final, mask, token_weights, tau,
                                     chunk_size=2)
    value.backward()

    hand_hidden = hidden.detach().clone().requires_grad_(True)
    hand_weight = weight.detach().clone().requires_grad_(True)
    expected, expected_per_loop = 0.0, []
    for r in range(k):
        loop_total = 0.0
        for t in range(T):
            for i in range(b):
                if not mask[t, i]:
                    continue
                p = torch.softmax(hand_hidden[r, t, i] @ hand_weight.t() / tau, dim=-1)
                q = torch.softmax(final[0, t, i] / tau, dim=-1)
                m = (p + q) / 2
                jsd = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
                loop_total = loop_total + token_weights[t, i] * jsd
        expected_per_loop.append(loop_total.item())
        expected = expected + loop_total / k
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), abs=1e-12)
    assert per_loop.tolist() == pytest.approx(expected_per_loop, abs=1e-12)
    torch.testing.assert_close(hidden.grad, hand_hidden.grad)
    torch.testing.assert_close(weight.grad, hand_weight.grad)


def test_sampled_keys_are_a_recent_window_plus_strided_positions():
    # query at column 20, real tokens from column 3, window 4, stride 5
    assert sampled_key_columns(20, 3, 4, 5) == [3, 8, 13, 17, 18, 19, 20]
    assert sampled_key_columns(5, 3, 16, 32) == [3, 4, 5]  # the window covers it all


def test_sampled_steps_depend_on_the_rollout_not_on_the_batch():
    config = OISDLossConfig(attention_steps=2, attention_window=3, attention_stride=4)
    weights = torch.tensor([0.5, -0.25, 1.0])
    both = sample_attention_steps([5, 0, 6], 10, [4, 3, 10], ["a/0", "a/1", "b/0"], "7/3",
                                  config, weights)
    alone = sample_attention_steps([6], 12, [10], ["b/0"], "7/3", config, weights[2:])
    assert both.rows.tolist() == [0, 0, 2, 2]  # row 1 has no response: no samples
    # b/0's steps are the same in both batches (its columns shift with the prompt length)
    assert (both.query_columns[2:] - 10).tolist() == (alone.query_columns - 12).tolist()
    assert both.weights.tolist() == pytest.approx([0.25, 0.25, 0.5, 0.5])
    first = 10 - 4
    for column, keys, valid in zip(both.query_columns[:2], both.key_columns[:2],
                                   both.key_valid[:2]):
        assert keys[valid].tolist() == sampled_key_columns(int(column), first, 3, 4)


def test_attention_jsd_by_hand_with_negative_weights():
    torch.manual_seed(3)
    s, b, heads, groups, d = 9, 2, 4, 2, 5
    query = torch.randn(s, b, heads, d, dtype=torch.float64, requires_grad=True)
    key = torch.randn(s, b, groups, d, dtype=torch.float64, requires_grad=True)
    final_query = torch.randn(s, b, heads, d, dtype=torch.float64)
    final_key = torch.randn(s, b, groups, d, dtype=torch.float64)
    key_lists = [[1, 4, 5, 6], [0, 2], [3, 7, 8]]
    width = 4
    samples = AttentionSamples(
        rows=torch.tensor([0, 1, 1]), query_columns=torch.tensor([6, 2, 8]),
        key_columns=torch.tensor([keys + [keys[-1]] * (width - len(keys)) for keys in key_lists]),
        key_valid=torch.tensor([[True] * len(keys) + [False] * (width - len(keys))
                                for keys in key_lists]),
        weights=torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64))
    scale = 0.4
    value = attention_jsd(query, key, final_query, final_key, samples, scale, total_heads=8)
    value.backward()

    hand_query = query.detach().clone().requires_grad_(True)
    hand_key = key.detach().clone().requires_grad_(True)
    expected = 0.0
    for sample, keys in enumerate(key_lists):
        row, column = int(samples.rows[sample]), int(samples.query_columns[sample])
        for head in range(heads):
            group = head // (heads // groups)
            rows = []
            for q, kk in ((hand_query, hand_key), (final_query, final_key)):
                scores = torch.stack([q[column, row, head] @ kk[j, row, group] for j in keys])
                rows.append(torch.softmax(scale * scores, dim=0))
            p, target = rows[0], rows[1].detach()
            m = (p + target) / 2
            jsd = 0.5 * (p * (p / m).log()).sum() + 0.5 * (target * (target / m).log()).sum()
            expected = expected + samples.weights[sample] * jsd / 8
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), abs=1e-12)
    assert expected.item() != 0
    torch.testing.assert_close(query.grad, hand_query.grad)
    torch.testing.assert_close(key.grad, hand_key.grad)


@pytest.mark.parametrize("override, message", [
    ({"loops": [2]}, "oisd.loops"), ({"loops": [0]}, "oisd.loops"),
    ({"logit_coef": -0.1}, "logit_coef"), ({"attention_coef": -1.0}, "attention_coef"),
    ({"advantage_clip": -1.0}, "advantage_clip"), ({"attention_layer": 2}, "attention_layer"),
    ({"attention_window": 0}, "attention_window")])
def test_bad_oisd_settings_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        OISDLossConfig(**override).validate(student_loops=2, num_layers=2)


def _tiny_model(seed=0):
    from nemo_loop.config import CONF_DIR, read_section
    from nemo_loop.models.looplm.config import LoopModelConfig
    from nemo_loop.models.looplm.model import build_loop_model

    config = read_section(CONF_DIR / "model" / "tiny.yaml", LoopModelConfig)
    torch.manual_seed(seed)
    return build_loop_model(config.transformer_config())


def test_attention_probe_gradients_through_the_loop_pipeline(megatron_single_process):
    """The probe's detached copies + gradient taps give the pipeline the same parameter
    gradients as one plain autograd pass through the model."""
    from nemo_loop.data.sequences import build_batch
    from nemo_loop.models.looplm.attention_probe import AttentionProbe
    from nemo_loop.models.looplm.pipeline import forward_backward_loops

    model = _tiny_model()
    torch.manual_seed(1)
    # the probe tells micro-batches apart by their attention-mask tensors
    micro_batches = [build_batch([torch.randint(1, 64, (7,)).tolist(), [5, 6]],
                                 [[7, 8, 9], [3]], pad_id=0).as_micro_batch(slice(None))
                     for _ in range(2)]
    # row 0: prompt in columns 0-6, response 7-9; row 1: prompt 5-6, response 7
    samples = AttentionSamples(rows=torch.tensor([0, 1]), query_columns=torch.tensor([9, 7]),
                               key_columns=torch.tensor([[0, 5, 8, 9], [5, 6, 7, 7]]),
                               key_valid=torch.tensor([[True] * 4, [True] * 3 + [False]]),
                               weights=torch.tensor([1.0, -0.5]))
    probe = AttentionProbe(model, layer=-1)

    def loss(query_key_of_loop, output):
        """Attention term between loops 1 and 3, plus a term on the readouts."""
        query, key = query_key_of_loop(1)
        final_query, final_key = query_key_of_loop(3)
        return attention_jsd(query, key, final_query, final_key, samples, probe.softmax_scale,
                             4) + output.readouts.sum() * 1e-3

    with probe:  # the loop pipeline, in whatever order its schedule runs the chunks
        forward_backward_loops(model, micro_batches, lambda batch, output: (loss(
            lambda loop: probe.query_key(batch["attention_mask"], loop), output), {}),
            num_loops=3, logit_loops=[3], compute_logits=False)
    pipeline = {name: p.grad.clone() for name, p in model.named_parameters()
                if p.grad is not None}
    model.zero_grad()

    plain_probe = AttentionProbe(model, layer=-1, pipelined=False)
    with plain_probe:  # no pipeline: one plain forward per micro-batch, calls in loop order
        total = 0.0
        for batch in micro_batches:
            output = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                           num_loops=3, logit_loops=[3], compute_logits=False)
            total = total + loss(
                lambda loop: plain_probe.query_key(batch["attention_mask"], loop), output)
        total.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert pipeline.keys() == plain.keys()
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    assert pipeline[qkv].abs().max() > 0
    for name in plain:
        torch.testing.assert_close(pipeline[name], plain[name], rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_rltt_exit_pdf_gradient_reaches_the_models_exit_gate(megatron_single_process):
    from nemo_loop.losses.policy_gradient import PolicyLossConfig, rltt_loop_weights, rltt_loss
    from nemo_loop.losses.token_logprobs import token_logprobs

    grads = {}
    for kind in ("exit_pdf", "uniform"):
        model = _tiny_model()
        ids = torch.randint(64, (2, 6), generator=torch.Generator().manual_seed(0))
        output = model(ids, num_loops=3, compute_logits=False)
        targets = ids.t()[1:]
        per_loop = torch.stack([token_logprobs(readout[:-1], model.output_weight(), targets)[0]
                                for readout in output.readouts])
        omega = rltt_loop_weights(kind, 3, exit_probs=output.exit_probs[:, :-1])
        weights = torch.full_like(targets, 0.1, dtype=torch.float32)
        loss, _ = rltt_loss(per_loop, omega, torch.tensor([1.0, -1.0]), weights,
                            PolicyLossConfig(kl_coef=0.0))
        loss.backward()
        grads[kind] = model.exit_gate.weight.grad
    assert grads["exit_pdf"] is not None and grads["exit_pdf"].abs().max() > 1e-4
    assert grads["uniform"] is None or grads["uniform"].abs().max() == 0
