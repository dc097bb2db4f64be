"""Mixed-difficulty held-out shell games: disjoint from training, stratified, reproducible, and
the full-length sets unchanged."""

from __future__ import annotations

import collections
import itertools

import pytest
import torch

from nemo_loop.tasks import TaskConfig, build_task
from nemo_loop.tasks import shell_game as sg

MIXED = sg.ShellGameConfig(heldout_swaps=[2, 3, 4, 5, 6, 7])


def _all_games(config, length):
    return [sg.render(config, start, list(swaps)) for start in range(config.num_cups)
            for swaps in itertools.product(range(len(config.swaps())), repeat=length)]


def test_short_lengths_hold_out_exact_shares_and_keep_single_swaps_in_training():
    for length in (1, 2, 3, 4):
        splits = collections.Counter(sg.split_of(game, MIXED)
                                     for game in _all_games(MIXED, length))
        total = sum(splits.values())
        if length == 1:
            assert splits == {"train": total}
        else:  # ⌈20%⌉ test, ⌈10%⌉ validation
            assert splits["test"] == -(-total * 2 // 10)
            assert splits["validation"] == -(-total // 10)


@pytest.mark.parametrize("split", ["test", "validation"])
def test_mixed_sets_are_disjoint_from_training_stratified_and_reproducible(split):
    chosen = sg.mixed_problems(MIXED, split, 40)
    assert chosen == sg.mixed_problems(MIXED, split, 40)
    per_length = collections.Counter(length for length, _ in chosen)
    available = {k: sum(sg.split_of(g, MIXED) == split for g in _all_games(MIXED, k))
                 for k in (2, 3, 4)}
    assert per_length == {2: available[2], 3: min(40, available[3]),
                          4: min(40, available[4]), 5: 40, 6: 40, 7: 40, 8: 40}
    assert available[2] < 40  # k = 2 has 27 games: all of its held-out ones are taken
    texts = [problem.text for _, problem in chosen]
    assert len(set(texts)) == len(texts)
    for length, problem in chosen:
        assert sg.split_of(problem, MIXED) == split
        assert sg.swaps_of(problem.text) == length
        assert problem.answer == str(sg.play(MIXED, int(problem.text.split()[1]), [
            MIXED.swaps().index(tuple(map(int, w.split("-"))))
            for w in problem.text.split()[3:-1]]))
    generator = torch.Generator().manual_seed(0)
    training = {sg.draw(MIXED, "train", generator).text for _ in range(4000)}
    assert not training & set(texts)
    assert {sg.swaps_of(text) for text in training} == set(range(1, 9))


def test_stratified_training_prompts_avoid_every_held_out_game():
    """Training prompts of the held-out lengths (a student's prompt set) come from the train
    split only, stratified the same way, all of a short length's train games where fewer."""
    chosen = sg.mixed_problems(MIXED, "train", 30)
    assert chosen == sg.mixed_problems(MIXED, "train", 30)
    per_length = collections.Counter(length for length, _ in chosen)
    assert per_length[2] == 27 - 6 - 3 and all(per_length[k] == 30 for k in range(3, 9))
    held_out = {p.text for split in ("test", "validation")
                for _, p in sg.mixed_problems(MIXED, split, 100)}
    assert all(sg.split_of(p, MIXED) == "train" for _, p in chosen)
    assert not held_out & {p.text for _, p in chosen}


def test_full_length_sets_are_unchanged():
    plain = sg.ShellGameConfig()
    assert sg.problems(plain, "test", 300) == sg.problems(MIXED, "test", 300)
    eights = [problem for length, problem in sg.mixed_problems(MIXED, "test", 50)
              if length == 8]
    assert eights == sg.problems(plain, "test", 50)
    # Without heldout_swaps every shorter game is training data, as before.
    assert all(sg.split_of(game, plain) == "train" for game in _all_games(plain, 3))


def test_task_records_and_difficulty():
    task = build_task(TaskConfig(name="shell_game", shell_game=MIXED))
    records = task.stratified_problems("test", 5)
    assert [r.id for r in records][:6] == ["k2-0", "k2-1", "k2-2", "k2-3", "k2-4", "k3-5"]
    assert [task.difficulty(r.problem) for r in records] == \
        [int(r.id.split("-")[0][1:]) for r in records]
    assert task.difficulty("what is 2 + 2?") is None


@pytest.mark.parametrize("lengths,match", [([1, 4], r"\[2, num_swaps=8\]"), ([9], "in"),
                                           ([3, 3], "distinct")])
def test_invalid_heldout_lengths_are_named(lengths, match):
    with pytest.raises(ValueError, match="heldout_swaps"):
        sg.ShellGameConfig(heldout_swaps=lengths).validate()
