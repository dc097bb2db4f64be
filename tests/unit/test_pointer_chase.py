import pytest
import torch

from nemo_loop.data import pointer_chase as pc


def _solve(prompt):
    """Follow the queried chain through the prompt's assignments."""
    tokens = list(prompt)
    assignments = {}
    body = tokens[1:tokens.index(pc.QUERY)]
    for i in range(0, len(body), 4):
        target, equals, source, semicolon = body[i:i + 4]
        assert (equals, semicolon) == (pc.EQUALS, pc.SEMICOLON)
        assignments[target] = source
    value, hops = tokens[tokens.index(pc.QUERY) + 1], 0
    while value >= pc.FIRST_VARIABLE:
        value, hops = assignments[value], hops + 1
    return value, hops


def test_every_problem_has_the_stated_answer_and_chain_length():
    config = pc.PointerChaseConfig(hops=3, distractor_chains=2)
    for problem in pc.problems(config, 50, "train") + pc.problems(config, 50, "test"):
        answer, hops = _solve(problem.prompt)
        assert answer == problem.answer and hops == 3
        assert problem.with_hint()[:4] == (pc.BOS, pc.HINT, problem.answer, pc.SEMICOLON)


def test_train_and_test_streams_differ_and_are_seeded():
    config = pc.PointerChaseConfig()
    train, test = pc.problems(config, 200, "train"), pc.problems(config, 200, "test")
    assert not set(p.prompt for p in train) & set(p.prompt for p in test)
    assert pc.problems(config, 5, "test") == test[:5]


def test_training_batches_mix_chain_lengths_and_mask_only_the_answer():
    config = pc.PointerChaseConfig(hops=3, min_hops=1, distractor_chains=1, hint_fraction=0.0)
    batch = pc.sample_batch(config, 64, torch.Generator().manual_seed(0))
    seen = set()
    for row, mask, labels in zip(batch["input_ids"], batch["loss_mask"], batch["labels"]):
        tokens = [t for t in row.tolist() if t != pc.PAD] + [labels[-1].item()]
        answer, hops = _solve(tokens[:tokens.index(pc.QUERY) + 3])
        seen.add(hops)
        assert mask.sum() == 2 and labels[mask.bool()].tolist() == [answer, pc.EOS]
    assert seen == {1, 2, 3}


@pytest.mark.parametrize("kwargs, message", [
    (dict(hops=0), "hops"), (dict(hops=3, min_hops=4), "min_hops"),
    (dict(hops=10, distractor_chains=2), "variables"), (dict(hint_fraction=2.0), "hint"),
])
def test_bad_task_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pc.PointerChaseConfig(**kwargs).validate(vocab_size=64)
    with pytest.raises(ValueError, match="vocab"):
        pc.PointerChaseConfig().validate(vocab_size=16)
