import itertools
import json

import pytest
import torch

from nemo_loop.data.chat import ChatTokenizer
from nemo_loop.data.prompts import PromptSetConfig, load_prompt_set, write_prompt_set
from nemo_loop.tasks import TaskConfig, build_task
from nemo_loop.tasks import shell_game as sg


def _brute_force(text: str) -> str:
    """Track every cup's content, a different algorithm from ``play``."""
    _, start, _, *swaps, _ = text.split()
    cups = list(range(10))
    ball_cup = int(start)
    contents = {c: c == ball_cup for c in cups}
    for swap in swaps:
        first, second = map(int, swap.split("-"))
        contents[first], contents[second] = contents[second], contents[first]
    return str(next(c for c, has_ball in contents.items() if has_ball))


def test_answers_follow_the_ball():
    config = sg.ShellGameConfig(num_cups=4, num_swaps=7)
    assert sg.render(config, 1, [0]).text == "ball 1 | 0-1 ="  # swaps listed as (0,1), (0,2), ...
    assert sg.render(config, 1, [0]).answer == "0"
    assert sg.render(config, 2, [0, 0]).answer == "2"
    for problem in sg.problems(config, "test", 200):
        assert problem.answer == _brute_force(problem.text)
        assert len(problem.text.split()) == 4 + config.num_swaps


def test_splits_are_disjoint_distinct_and_reproducible():
    config = sg.ShellGameConfig(num_swaps=8)
    splits = {name: sg.problems(config, name, 300) for name in sg.SPLITS}
    texts = {name: {p.text for p in problems} for name, problems in splits.items()}
    assert all(len(texts[name]) == 300 for name in sg.SPLITS)
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    assert sg.problems(config, "test", 300) == splits["test"]
    assert all(sg.split_of(p, config) == "test" for p in splits["test"])
    generator = torch.Generator().manual_seed(0)
    training = [sg.draw(config, "train", generator) for _ in range(500)]
    assert not {p.text for p in training} & texts["test"]
    lengths = {len(p.text.split()) - 4 for p in training}
    assert lengths == set(range(config.min_swaps, config.num_swaps + 1))
    # Short games are never held out, so training sees every single-swap rule.
    assert {(p.text, p.answer) for p in training if p.text.count("-") == 1} == {
        (sg.render(config, start, [swap]).text, sg.render(config, start, [swap]).answer)
        for start in range(3) for swap in range(3)}
    # Answers are spread over the cups, so chance is 1/num_cups.
    counts = torch.bincount(torch.tensor([int(p.answer) for p in splits["test"]]))
    assert counts.min() > 300 / config.num_cups * 0.7


def _split_by_brute_force(config, split: str) -> set[str]:
    """Every full-length game of ``split``, rendered and hashed one by one."""
    games = {sg.render(config, start, list(swaps))
             for start in range(config.num_cups)
             for swaps in itertools.product(range(len(config.swaps())), repeat=config.num_swaps)}
    return {game.text for game in games if sg.split_of(game, config) == split}


def test_small_splits_are_counted_exactly_and_may_be_used_up():
    """Issue 23: 3 cups × 3 swaps = 81 games, 3 of them validation games; asking for 4 used
    to pass an estimate (~8) and then sample forever."""
    config = sg.ShellGameConfig(num_swaps=3)
    validation = _split_by_brute_force(config, "validation")
    assert sg.num_games(config) == 81 and sg.split_size(config, "validation") == (3, True)
    assert len(validation) == 3
    with pytest.raises(ValueError, match="4 distinct validation games requested, but with "
                       "num_cups=3 and num_swaps=3 the validation split holds 3 of its 81 "
                       "games; ask for at most 3"):
        sg.problems(config, "validation", 4)
    # Exactly all of them is fine (and finishes: the sampling is bounded either way).
    assert {p.text for p in sg.problems(config, "validation", 3)} == validation
    four = sg.ShellGameConfig(num_swaps=4)  # 243 games
    assert sg.split_size(four, "test") == (len(_split_by_brute_force(four, "test")), True)
    with pytest.raises(ValueError, match="test split holds 36 of its 243 games"):
        sg.problems(four, "test", 100)
    # Too many games to count: the expected share, and at most half of it may be asked for.
    big = sg.ShellGameConfig(num_cups=4, num_swaps=8)
    assert sg.split_size(big, "validation") == (int(0.1 * 4 * 6 ** 8), False)
    with pytest.raises(ValueError, match="holds about 671846 .* at most 335923"):
        sg.check_count(big, "validation", 400_000)


def test_sampling_gives_up_with_an_error_instead_of_looping(monkeypatch):
    config = sg.ShellGameConfig(num_swaps=3)
    monkeypatch.setattr(sg, "_hashed_split", lambda text: "train")  # no held-out game at all
    monkeypatch.setattr(sg, "split_size", lambda config, split: (5, True))
    with pytest.raises(RuntimeError, match=r"no validation game in 10000 draws"):
        sg.problems(config, "validation", 2)


def test_the_issues_command_fails_at_load_time(tmp_path):
    """recipes/pretrain_looplm.py task.shell_game.num_swaps=3 validation_problems=4 ... hung
    after its last step; now the config is refused before anything runs."""
    from nemo_loop.algorithms.pretrain import PretrainConfig
    from nemo_loop.config import CONF_DIR, load_config

    with pytest.raises(ValueError, match="4 distinct validation games requested.*holds 3 of "
                                         "its 81"):
        load_config(PretrainConfig, CONF_DIR / "pretrain.yaml", [
            "task.shell_game.num_swaps=3", "validation_problems=4", "test_problems=4",
            "trainer.max_steps=2", "trainer.eval_interval=0", f"output_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_tokenizer_round_trip_and_unknown_words(tmp_path):
    config = sg.ShellGameConfig()
    tokenizer = build_task(TaskConfig(name="shell_game")).tokenizer()
    # The saved artifact is the same tokenizer.
    saved = ChatTokenizer.from_file(sg.CHAT_CONFIG.__class__(
        tokenizer_path=str(sg.write_tokenizer(config, tmp_path)), system_prompt=None,
        instruction_suffix="", template="plain"))
    assert saved.encode_prompt("ball 2 | 0-1 =") == tokenizer.encode_prompt("ball 2 | 0-1 =")
    assert tokenizer.vocab_size == len(sg.vocabulary(config))
    assert (tokenizer.pad_id, tokenizer.im_end_id) == (0, 2)
    problem = sg.problems(config, "test", 1)[0]
    ids = tokenizer.encode_prompt(problem.text)
    assert len(ids) == len(problem.text.split())
    assert tokenizer.decode(ids) == problem.text
    hinted = tokenizer.encode_prompt(problem.text, sg.HINT_TEMPLATE.format(answer=problem.answer))
    assert hinted[:len(ids)] == ids and tokenizer.decode(hinted[len(ids):]) == \
        f"hint {problem.answer}"
    answer = tokenizer.encode_prompt(problem.answer)
    assert tokenizer.decode(answer + [tokenizer.im_end_id]) == problem.answer
    with pytest.raises(ValueError, match=r"outside the vocabulary.*'0-7'"):
        tokenizer.encode_prompt("ball 1 | 0-7 =")


def test_prompt_set_round_trip_and_exact_checker(tmp_path):
    config = sg.ShellGameConfig()
    task = build_task(TaskConfig(name="shell_game"))
    problems = sg.problems(config, "test", 5)
    path = write_prompt_set(tmp_path / "test.jsonl", task.heldout_problems("test", 5))
    records = load_prompt_set(PromptSetConfig(path=str(path), id_field="id"))
    assert [(r.problem, r.answer) for r in records] == [(p.text, p.answer) for p in problems]
    assert json.loads(path.read_text().splitlines()[0])["id"] == "0"
    gold = problems[0].answer
    wrong = str((int(gold) + 1) % config.num_cups)
    assert task.check(f"{gold} ", gold).correct
    assert not task.check(wrong, gold).correct
    assert task.check("", gold).extracted is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_cups=2), "num_cups"),
    (dict(min_swaps=5, num_swaps=3), "min_swaps"),
    (dict(hint_fraction=1.5), "hint_fraction"),
])
def test_invalid_configs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sg.ShellGameConfig(**kwargs).validate()
