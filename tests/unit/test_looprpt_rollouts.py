"""The model's readout transform (LoopRPT's noisy latent rollouts hook into the loop API there)
and LoopRPT's seeded latent noise and exit draws."""

import pytest
import torch

from nemo_loop.models.looplm.config import LoopModelConfig

TINY = LoopModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                       num_query_groups=2, vocab_size=64, max_sequence_length=32, num_loops=3)


@pytest.fixture
def model(megatron_single_process):
    from nemo_loop.models.looplm.model import build_loop_model

    torch.manual_seed(0)
    return build_loop_model(TINY.transformer_config())


def _tokens(batch=2, seq=7):
    return torch.randint(0, TINY.vocab_size, (batch, seq),
                         generator=torch.Generator().manual_seed(0))


def _shift(readout, loop):
    return readout + 0.5 * loop


@torch.no_grad()
def test_the_transform_replaces_each_readout_and_feeds_the_next_loop(model):
    ids = _tokens()
    got = model(ids, readout_transform=_shift)
    # by hand: final-norm output of loop r, + 0.5·r, is both readout r and the input of loop r+1
    hidden = model.embed(ids)
    rotary = model.rotary_embedding(ids.shape[1])
    expected = []
    for loop in range(1, TINY.num_loops + 1):
        hidden = model.run_shared_layers(hidden, None, rotary) + 0.5 * loop
        expected.append(hidden)
    torch.testing.assert_close(got.readouts, torch.stack(expected), rtol=0, atol=0)
    torch.testing.assert_close(got.exit_logits, model.exit_logits(expected), rtol=0, atol=0)
    plain = model(ids)
    assert not torch.allclose(plain.readouts[1], got.readouts[1] - 1.0)  # loop 2 saw loop 1's shift


@torch.no_grad()
def test_the_loop_pipeline_applies_the_micro_batch_transform(model):
    from nemo_loop.models.looplm.pipeline import forward_backward_loops

    ids = _tokens()
    expected = model(ids, readout_transform=_shift, compute_logits=False)
    [output] = forward_backward_loops(model, [dict(input_ids=ids, readout_transform=_shift)],
                                      None, compute_logits=False, forward_only=True)
    torch.testing.assert_close(output.readouts, expected.readouts, rtol=0, atol=0)
    [plain] = forward_backward_loops(model, [dict(input_ids=ids)], None,
                                     compute_logits=False, forward_only=True)
    assert not torch.allclose(plain.readouts, output.readouts)


def test_latent_noise_is_seeded_per_row_and_loop_and_spares_the_clean_rows():
    from nemo_loop.algorithms.looprpt import LatentNoise, _generator, exit_uniforms

    seq, hidden, copies, sigma = 4, 3, 2, 0.1
    readout = torch.randn(seq, (copies + 1) * 3, hidden, generator=torch.Generator().manual_seed(1))
    noisy = LatentNoise(sigma, range(10, 13), copies, seed=7, step=5)(readout, 2)
    assert torch.equal(noisy[:, :3], readout[:, :3])
    for i, row in enumerate(range(10, 13)):
        epsilon = torch.randn(copies, seq, hidden, generator=_generator(7, 5, row, 2))
        for g in range(copies):
            torch.testing.assert_close(noisy[:, 3 + g * 3 + i],
                                       readout[:, 3 + g * 3 + i] + sigma * epsilon[g])
    # another loop, step or seed draws other noise
    assert not torch.equal(LatentNoise(sigma, range(10, 13), copies, 7, 5)(readout, 3), noisy)
    assert not torch.equal(LatentNoise(sigma, range(10, 13), copies, 7, 6)(readout, 2), noisy)
    # the same row gets the same noise in any micro-batch split
    halves = [LatentNoise(sigma, rows, copies, 7, 5)(
        torch.cat([readout[:, columns] for columns in (
            slice(first, first + len(rows)), slice(3 + first, 3 + first + len(rows)),
            slice(6 + first, 6 + first + len(rows)))], dim=1), 2)
        for first, rows in ((0, range(10, 12)), (2, range(12, 13)))]
    torch.testing.assert_close(halves[0][:, 2:4], noisy[:, 3:5])  # copy 0 of rows 10, 11
    torch.testing.assert_close(halves[1][:, 1:2], noisy[:, 5:6])  # copy 0 of row 12
    draws = exit_uniforms(range(10, 13), copies, seq, seed=7, step=5)
    assert draws.shape == (seq, copies * 3)
    torch.testing.assert_close(exit_uniforms(range(12, 13), copies, seq, 7, 5),
                               draws[:, [2, 5]])
