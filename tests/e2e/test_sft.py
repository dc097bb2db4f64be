"""The SFT baseline end to end: shell-game answers and GSM8K solutions, exact resume, bad data."""

import json

import pytest

from nemo_loop.algorithms.sft import SFTConfig, train
from nemo_loop.config import CONF_DIR, load_config
from nemo_loop.data.prompts import load_prompt_set, write_prompt_set
from nemo_loop.tasks import TaskConfig, build_task
from tests.resume import assert_exact_resume


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    """Training-split shell games as a prompt-set file (what the compression experiment writes)."""
    task = build_task(TaskConfig(name="shell_game"))
    path = tmp_path_factory.mktemp("games") / "train.jsonl"
    return write_prompt_set(path, task.heldout_problems("train", 64))


def _game_config(output_dir, games, *overrides):
    return load_config(SFTConfig, CONF_DIR / "sft.yaml", [
        f"output_dir={output_dir}", "model=tiny", "task.name=shell_game", f"data.path={games}",
        "data.problem_field=problem", "data.answer_format=plain", "data.solution_field=null",
        "data.id_field=id", "trainer.examples_per_step=8", "trainer.micro_batch_size=4",
        *overrides])


def _math_config(output_dir, *overrides):
    return load_config(SFTConfig, CONF_DIR / "sft.yaml", [
        f"output_dir={output_dir}", "data.limit=8", *overrides])


@pytest.mark.resume
def test_resumed_sft_repeats_the_uninterrupted_losses(megatron_single_process, tmp_path, games):
    common = ["trainer.save_interval=2", "loss.kind=ouro"]
    straight = train(_game_config(tmp_path / "straight", games, "trainer.max_steps=4", *common))
    first = train(_game_config(tmp_path / "resumed", games, "trainer.max_steps=2", *common))
    second = train(_game_config(tmp_path / "resumed", games, "trainer.max_steps=4", *common))
    assert_exact_resume(straight, first, second, tmp_path / "resumed")


def test_sft_learns_the_shell_game_answers_at_two_loops(megatron_single_process, tmp_path,
                                                        games):
    history = train(_game_config(tmp_path, games, "trainer.max_steps=30", "loss.kind=final_loop",
                                 "optim.lr=3e-3", "optim.decay_style=constant",
                                 "trainer.log_interval=10"))
    assert len(history[0]["ce_per_loop"]) == 1  # final_loop reads loop R̃ only
    # chance over the 14-token vocabulary is ln 14 ≈ 2.6 per token; the answer's end-of-turn
    # token and the 3-way answer give ≤ (ln 3)/2 ≈ 0.55 once the format is learnt
    assert history[0]["loss"] > 2.0 and history[-1]["loss"] < 0.8, \
        (history[0]["loss"], history[-1]["loss"])


def test_sft_targets_are_the_reference_solutions_in_the_prompt_format(megatron_single_process,
                                                                      tmp_path):
    from nemo_loop.algorithms.sft import my_micro_batches, setup
    from nemo_loop.losses.normalization import LossNormalizer

    state = setup(_math_config(tmp_path, "trainer.resume=false"))
    micro_batches = my_micro_batches(state)
    masks = [batch["loss_mask"] for batch in micro_batches]
    normalizer = LossNormalizer.count(masks)
    total_weight = sum(float(normalizer.weights(mask, "token_mean").sum()) for mask in masks)
    assert abs(total_weight - 1.0) < 1e-6  # token_mean over the whole step's batch
    references = {state.task.sft_target(record).strip()
                  for record in load_prompt_set(state.config.data)}
    for batch in micro_batches:
        for row in range(batch["labels"].shape[0]):
            targets = batch["labels"][row][batch["loss_mask"][row] > 0]
            assert targets[-1] == state.tokenizer.im_end_id  # the answer ends the turn
            assert state.tokenizer.decode(targets[:-1].tolist()).strip() in references
            first = int((batch["loss_mask"][row] > 0).nonzero()[0])
            prompt = state.tokenizer.decode(batch["input_ids"][row][:first + 1].tolist())
            assert prompt.rstrip().endswith("assistant")  # ChatML, as the LLOPSD student sees
            assert "Please reason step by step" in prompt


def test_sft_data_without_solutions_is_a_named_error(megatron_single_process, tmp_path):
    with pytest.raises(ValueError, match="data.solution_field is not set"):
        _math_config(tmp_path, "data.solution_field=null")
    path = tmp_path / "partial.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "answer": "2", "solution": "\\boxed{2}"})
                    + "\n" + json.dumps({"problem": "2+2?", "answer": "4", "solution": " "})
                    + "\n")
    config = _math_config(tmp_path / "run", f"data.path={path}", "data.problem_field=problem",
                          "data.answer_format=plain", "data.solution_field=solution",
                          "trainer.examples_per_step=2", "trainer.micro_batch_size=1")
    with pytest.raises(ValueError, match=r"partial.jsonl: 1 of 2 records have no reference "
                                         r"solution in field 'solution' \(record ids \['1'\]"):
        train(config)


@pytest.mark.parametrize("override, message", [
    ("loss.kind=ce", "unknown supervised loss kind 'ce'"),
    ("trainer.student_loops=5", "student_loops"),
    ("loss.aggregation=sum", "loss.aggregation"),
    ("loss.entropy_beta=-1", "entropy_beta"),
])
def test_bad_sft_configs_name_the_problem(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _math_config(tmp_path, override)


def test_sft_batch_sizes_must_divide(tmp_path):
    config = _math_config(tmp_path, "trainer.examples_per_step=6", "trainer.micro_batch_size=4")
    with pytest.raises(ValueError, match="examples_per_step"):
        config.validate(world_size=1)


def test_sft_config_and_preset_load():
    default = load_config(SFTConfig, CONF_DIR / "sft.yaml")
    preset = load_config(SFTConfig, CONF_DIR / "baselines" / "sft_final_loop.yaml")
    assert default.loss.kind == "ouro" and preset.loss.kind == "final_loop"
    assert default.data.solution_field == "answer"  # GSM8K's worked solutions
