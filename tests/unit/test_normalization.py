"""The one normalization rule (counts, weights) and token-budget micro-batches, by hand."""

import pytest
import torch

from nemo_loop.data.sequences import micro_batch_rows, padded_tokens
from nemo_loop.losses.normalization import LossNormalizer

# two micro-batches, batch-first: 3 + 2 rows, one of them fully masked
FIRST = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
SECOND = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)


def test_counts_cover_every_micro_batch_and_skip_empty_rows():
    normalizer = LossNormalizer.count([FIRST, SECOND])
    assert (normalizer.tokens, normalizer.sequences) == (10.0, 4.0)


def test_token_mean_weighs_every_token_of_the_step_alike():
    normalizer = LossNormalizer.count([FIRST, SECOND])
    first = normalizer.weights(FIRST, "token_mean")
    second = normalizer.weights(SECOND, "token_mean")
    torch.testing.assert_close(first, FIRST / 10)
    assert (first.sum() + second.sum()).item() == pytest.approx(1.0)


def test_sequence_mean_weighs_each_sequence_alike():
    normalizer = LossNormalizer.count([FIRST, SECOND])
    first = normalizer.weights(FIRST, "sequence_mean", torch.float64)
    second = normalizer.weights(SECOND, "sequence_mean", torch.float64)
    # rows of 3, 1, 0 | 2, 4 tokens; 4 sequences with a token
    assert first[0].tolist() == pytest.approx([1 / 12] * 3)
    assert first[1].tolist() == pytest.approx([1 / 4, 0, 0])
    assert first[2].tolist() == [0, 0, 0]
    assert second[1].tolist() == pytest.approx([1 / 16] * 4)
    assert (first.sum() + second.sum()).item() == pytest.approx(1.0)
    # the same weights whatever the split into micro-batches
    together = torch.zeros(5, 4)
    together[:3, :3], together[3:] = FIRST, SECOND
    whole = LossNormalizer.count([together]).weights(together, "sequence_mean", torch.float64)
    torch.testing.assert_close(whole[:3, :3], first)
    torch.testing.assert_close(whole[3:], second)


def test_unknown_aggregation_is_named():
    with pytest.raises(ValueError, match="aggregation must be one of"):
        LossNormalizer(1.0, 1.0).weights(FIRST, "median")


def test_counts_are_summed_over_the_group(megatron_single_process):
    from megatron.core import parallel_state

    normalizer = LossNormalizer.count([FIRST], parallel_state.get_data_parallel_group())
    assert (normalizer.tokens, normalizer.sequences) == (4.0, 2.0)


def test_fixed_micro_batches_keep_the_order():
    assert micro_batch_rows([3] * 5, [1] * 5, 2) == [[0, 1], [2, 3], [4]]


def test_token_budget_sorts_by_length_and_packs_up_to_the_budget():
    prompts = [4, 4, 4, 4, 4, 4]
    responses = [2, 30, 3, 1, 12, 2]
    groups = micro_batch_rows(prompts, responses, max_rows=4, max_tokens=40)
    # longest first: 34 alone (2 × 34 > 40); 16 and 7: 2 × 16 = 32; 6, 6 and 5: 3 × 6 = 18
    assert groups == [[1], [4, 2], [0, 5, 3]]
    assert sorted(row for rows in groups for row in rows) == list(range(6))
    assert all(len(rows) * (max(prompts[i] for i in rows) + max(responses[i] for i in rows))
               <= 40 for rows in groups)
    assert micro_batch_rows(prompts, responses, max_rows=2, max_tokens=1000) == \
        [[1, 4], [2, 0], [5, 3]]  # the row cap still applies
    fixed = micro_batch_rows(prompts, responses, 2)
    assert padded_tokens(prompts, responses, groups) < padded_tokens(prompts, responses, fixed)
