"""Group rollouts: G copies per prompt, verdicts and rewards from the task, groups and siblings,
and micro-batches of aligned rows."""

import pytest
import torch

from nemo_loop.algorithms.rollouts import RolloutConfig, generate_rollouts
from nemo_loop.generation.engine import GenerationEngine, GenerationResult
from nemo_loop.tasks import TaskConfig, build_task


class ScriptedEngine(GenerationEngine):
    """Answers prompt copy i with ``answers[i]`` and remembers what it was asked."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers, self.calls = tokenizer, answers, []

    def generate(self, prompts, num_loops, sampling):
        self.calls.append((prompts, num_loops, sampling))
        results = []
        for answer in self.answers[:len(prompts)]:
            ids = self.tokenizer.encode_prompt(answer) + [self.tokenizer.im_end_id]
            results.append(GenerationResult(ids, [-0.5] * len(ids), [-0.25] * len(ids), "stop",
                                            num_loops))
        return results

    def refit(self, source):
        raise NotImplementedError


def _task():
    return build_task(TaskConfig(name="shell_game"))


def test_g_rollouts_per_prompt_in_groups_with_verdicts_and_siblings():
    task = _task()
    tokenizer = task.tokenizer()
    records = task.heldout_problems("train", 2)
    wrong = {"0": "1", "1": "2", "2": "0"}
    # prompt 0: right, wrong, right; prompt 1: wrong, wrong, right
    answers = [records[0].answer, wrong[records[0].answer], records[0].answer,
               wrong[records[1].answer], wrong[records[1].answer], records[1].answer]
    engine = ScriptedEngine(tokenizer, answers)
    config = RolloutConfig(student_loops=3, samples_per_prompt=3, max_new_tokens=2)
    batch = generate_rollouts(engine, task, tokenizer, records, config, seed=11)

    prompts, loops, sampling = engine.calls[0]
    encoded = [tokenizer.encode_prompt(r.problem) for r in records]
    assert prompts == [encoded[0]] * 3 + [encoded[1]] * 3  # each prompt G times in a row
    assert loops == 3 and sampling.seed == 11 and sampling.max_new_tokens == 2
    assert len(batch) == 6 and batch.num_groups == 2
    assert [(r.group, r.sample) for r in batch.rollouts] == [(0, 0), (0, 1), (0, 2), (1, 0),
                                                              (1, 1), (1, 2)]
    assert batch.rewards().tolist() == [1, 0, 1, 0, 0, 1]
    assert [r.verdict.correct for r in batch.group_members(1)] == [False, False, True]
    assert batch.siblings(1) == [batch.rollouts[0], batch.rollouts[2]]  # never itself
    assert batch.rollouts[4].uid == f"{records[1].id}/1"
    assert batch.rollouts[0].record is records[0] and batch.rollouts[0].prompt == encoded[0]
    # a micro-batch of some rows, padded to their own longest prompt and response; teacher
    # prompts of another length keep the response window
    student = batch.micro_batch([4, 1], tokenizer.pad_id)
    teacher = batch.micro_batch([4, 1], tokenizer.pad_id,
                                prompts=[[5, 6] + r.prompt for r in batch.rollouts])
    assert student["rollouts"] == [batch.rollouts[4], batch.rollouts[1]]
    assert teacher["prompt_length"] == student["prompt_length"] + 2
    window = slice(student["prompt_length"], None)
    shifted = slice(teacher["prompt_length"], None)
    assert torch.equal(student["input_ids"][:, window], teacher["input_ids"][:, shifted])
    assert student["token_ids"].t().tolist() == [batch.rollouts[4].response,
                                                 batch.rollouts[1].response]
    assert student["loss_mask"].tolist() == [[1.0, 1.0], [1.0, 1.0]]  # [b, T]
    # π_old is the engine's log-prob under the distribution it sampled from
    assert student["old_logprobs"].sum().item() == pytest.approx(-1.0)


def test_one_sample_per_prompt_keeps_the_prompt_list_and_seed():
    """G = 1 hands the engine exactly the prompts LLOPSD handed it before groups existed."""
    task = _task()
    tokenizer = task.tokenizer()
    records = task.heldout_problems("train", 3)
    engine = ScriptedEngine(tokenizer, [r.answer for r in records])
    batch = generate_rollouts(engine, task, tokenizer, records,
                              RolloutConfig(samples_per_prompt=1), seed=5)
    assert engine.calls[0][0] == [tokenizer.encode_prompt(r.problem) for r in records]
    assert batch.rewards().tolist() == [1, 1, 1] and batch.siblings(0) == []
