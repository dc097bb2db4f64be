"""Group rollouts, shared by every on-policy algorithm (LLOPSD, GRPO, RLTT, OISD).

One step: sample prompts, let the engine generate G = ``rollout.samples_per_prompt`` responses
per prompt at R̃ = ``rollout.student_loops`` loops, decode them and let the task's verifier
judge each one (math-verify for math, exact match for the shell game); the reward is 1 for a
correct response and 0 otherwise. Every :class:`Rollout` knows its prompt group and its
verdict, so an algorithm can normalise rewards within a group (GRPO) or look at a sibling's
outcome (SDPO's sibling context).

Then the rollouts become micro-batches of aligned prompt+response rows
(``nemo_loop.data.sequences``: prompts left-padded, responses right-padded, so response token j
of every row sits in the same column), each padded to its own longest prompt and response, with
``[T, b]`` response ids and rollout-time log-probs and the ``[b, T]`` loss mask; which rows share
a micro-batch is ``trainer.micro_batch_size`` (consecutive rows) or, with
``trainer.max_tokens_per_micro_batch``, a token budget (rows sorted by length and packed).

Data parallelism: each rank generates for its share of the step's prompts, whole groups only,
so everything a group needs stays on one rank. With G = 1 the prompts, the seeds and therefore
the rollouts are exactly those LLOPSD drew before groups existed.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from nemo_loop.algorithms.common import check_token_budget
from nemo_loop.algorithms.training_run import validate_run_sections
from nemo_loop.data.chat import ChatTokenizer
from nemo_loop.data.prompts import PromptRecord, PromptSampler
from nemo_loop.data.sequences import build_batch, micro_batch_rows, response_targets
from nemo_loop.generation.engine import GenerationEngine, SamplingConfig
from nemo_loop.tasks import Task
from nemo_loop.tasks.answers import Verdict


@dataclass
class RolloutConfig(SamplingConfig):
    student_loops: int = 2  # R̃: the loop budget the policy generates (and is trained) with
    max_new_tokens: int = 24
    samples_per_prompt: int = 1  # G: rollouts per prompt, one group

    def validate(self) -> None:
        super().validate()
        if self.samples_per_prompt < 1:
            raise ValueError(f"rollout.samples_per_prompt (G) must be >= 1, got "
                             f"{self.samples_per_prompt}")


@dataclass
class Rollout:
    """One response to one prompt, with the verifier's verdict on it."""

    group: int  # index of its prompt among this rank's prompts of the step
    sample: int  # 0..G-1 within the group
    record: PromptRecord
    prompt: list[int]  # the student's prompt ids
    response: list[int]
    # log π_old(y_j | x, y_<j): the final loop R̃'s log-prob under the distribution the engine
    # sampled from (GenerationResult.sampling_logprobs: at rollout.temperature), π_old of a PPO
    # ratio whose π_θ the trainer computes at the same temperature.
    sampling_logprobs: list[float]
    text: str
    verdict: Verdict

    @property
    def reward(self) -> float:
        return 1.0 if self.verdict.correct else 0.0

    @property
    def uid(self) -> str:
        """Stable across data-parallel layouts: the prompt record's id and the sample index."""
        return f"{self.record.id}/{self.sample}"


@dataclass
class RolloutBatch:
    """This rank's rollouts of one step, group after group (the G samples of prompt 0, then
    prompt 1, …)."""

    rollouts: list[Rollout]
    samples_per_prompt: int
    generate_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.rollouts)

    @property
    def num_groups(self) -> int:
        return len(self.rollouts) // self.samples_per_prompt

    def group_members(self, group: int) -> list[Rollout]:
        size = self.samples_per_prompt
        return self.rollouts[group * size:(group + 1) * size]

    def siblings(self, index: int) -> list[Rollout]:
        """The other rollouts of the same prompt (never the rollout itself)."""
        rollout = self.rollouts[index]
        return [other for other in self.group_members(rollout.group) if other is not rollout]

    def rewards(self) -> torch.Tensor:
        return torch.tensor([rollout.reward for rollout in self.rollouts], dtype=torch.float64)

    def micro_batch(self, rows: list[int], pad_id: int,
                    prompts: list[list[int]] | None = None) -> dict:
        """The rollouts ``rows`` as one micro-batch, padded to their own longest prompt and
        response: ``input_ids``/``position_ids``/``attention_mask``, ``response_window`` (the
        columns predicting the response), ``prompt_length``, ``token_ids`` ``[T, b]``,
        ``old_logprobs`` ``[T, b]`` (π_old, 0 past each end), ``loss_mask`` ``[b, T]``
        (batch-first: the ``train_step`` contract) and the ``rollouts`` themselves.
        ``prompts`` (indexed like the rollouts) replaces the student prompts — a teacher's
        context + prompt — while the responses, hence ``T``, stay the same."""
        chosen = [self.rollouts[i] for i in rows]
        own_prompts = [r.prompt for r in chosen] if prompts is None else [prompts[i] for i in rows]
        responses = [r.response for r in chosen]
        batch = build_batch(own_prompts, responses, pad_id)
        token_ids, mask = response_targets(responses, batch.response_length, pad_id)
        old_logprobs = torch.zeros(batch.response_length, len(chosen), dtype=torch.float32)
        for column, rollout in enumerate(chosen):
            old_logprobs[:len(rollout.sampling_logprobs), column] = torch.tensor(
                rollout.sampling_logprobs)
        return dict(batch.as_micro_batch(slice(None)), response_window=batch.response_window,
                    prompt_length=batch.prompt_length, token_ids=token_ids,
                    old_logprobs=old_logprobs, loss_mask=mask.t(), rollouts=chosen)

    def metrics(self) -> dict:
        """Rollout length, accuracy (= mean reward) and the share of groups whose rewards all
        agree (no learning signal for group-normalised advantages), averaged over DP ranks."""
        lengths = [len(r.response) for r in self.rollouts]
        groups = [self.group_members(g) for g in range(self.num_groups)]
        uniform = sum(len({r.reward for r in members}) == 1 for members in groups)
        return {
            "rollout_length": dp_mean(sum(lengths) / len(lengths)),
            "rollout_accuracy": dp_mean(sum(r.reward for r in self.rollouts) / len(self.rollouts)),
            "uniform_reward_groups": dp_mean(uniform / len(groups)),
            "generation_tokens_per_s": sum(lengths) / max(self.generate_seconds, 1e-9),
        }


# ----- the step's prompts and rollouts -----

def rollout_seed(seed: int, step: int) -> int:
    """Depends only on (seed, step, DP rank), so resumed runs sample the same rollouts."""
    key = f"{seed}/{step}/{parallel_state.get_data_parallel_rank()}"
    return zlib.crc32(key.encode())


def data_parallel_share(items: list) -> list:
    """This data-parallel rank's share of a step's global list (strided)."""
    rank = parallel_state.get_data_parallel_rank()
    return items[rank::parallel_state.get_data_parallel_world_size()]


def my_records(sampler: PromptSampler, records: list[PromptRecord],
               prompts_per_step: int) -> list[PromptRecord]:
    """This rank's prompts of the next step (``prompts_per_step`` is global)."""
    return data_parallel_share([records[i] for i in sampler.next_indices(prompts_per_step)])


def generate_rollouts(engine: GenerationEngine, task: Task, tokenizer: ChatTokenizer,
                      records: list[PromptRecord], config: RolloutConfig,
                      seed: int) -> RolloutBatch:
    """G rollouts per record at ``config.student_loops`` loops, decoded and verified."""
    started = time.perf_counter()
    group_size = config.samples_per_prompt
    prompts = [tokenizer.encode_prompt(record.problem) for record in records]
    sampling = config.params(tokenizer.stop_token_ids, seed)
    # Each prompt G times in a row: the engine draws every copy from its own stream.
    repeated = [prompt for prompt in prompts for _ in range(group_size)]
    with torch.no_grad():
        results = engine.generate(repeated, config.student_loops, sampling)
    seconds = time.perf_counter() - started
    rollouts = []
    for index, result in enumerate(results):
        group, sample = divmod(index, group_size)
        record = records[group]
        text = tokenizer.decode(list(result.token_ids))
        rollouts.append(Rollout(group, sample, record, prompts[group], list(result.token_ids),
                                list(result.sampling_logprobs), text,
                                task.check(text, record.answer)))
    return RolloutBatch(rollouts, group_size, seconds)


def collect_rollouts(state) -> RolloutBatch:
    """This rank's rollouts of step ``state.step`` for any on-policy algorithm's state (it has
    ``config.trainer.{prompts_per_step, seed}``, ``config.rollout``, ``engine``, ``task``,
    ``tokenizer``, ``sampler`` and ``records``)."""
    config = state.config
    records = my_records(state.sampler, state.records, config.trainer.prompts_per_step)
    return generate_rollouts(state.engine, state.task, state.tokenizer, records, config.rollout,
                             rollout_seed(config.trainer.seed, state.step))


def validate_rollout_run(config, world_size: int | None, check_paths: bool,
                         algorithm: str) -> None:
    """What every on-policy algorithm's config shares: layout (PP = 1 and no sequence
    parallelism, the engine has neither), R̃ within the model's R, task, optimizer,
    checkpointing, prompt set, initial weights, rollout, engine and batch sizes."""
    parallel, trainer = config.parallel, config.trainer
    config.model.validate(parallel.tensor_parallel, parallel.pipeline_parallel)
    if parallel.pipeline_parallel > 1:
        raise ValueError(f"{algorithm} needs parallel.pipeline_parallel=1: the generation engine "
                         f"does not support pipeline parallelism yet")
    if parallel.sequence_parallel:
        raise ValueError(f"{algorithm} does not support parallel.sequence_parallel yet")
    student, loops = config.rollout.student_loops, config.model.num_loops
    if not 1 <= student <= loops:
        raise ValueError(f"rollout.student_loops (R̃={student}) must be in [1, "
                         f"model.num_loops (R={loops})]")
    config.task.validate()
    validate_run_sections(config, check_paths)
    config.data.validate(check_path=check_paths)
    config.rollout.validate()
    config.generation.validate()
    if config.generation.exit.adaptive:
        raise ValueError(f"generation.exit.policy={config.generation.exit.policy}: {algorithm} "
                         f"rollouts run every token at rollout.student_loops (the loss "
                         f"recomputes that loop budget); adaptive exit is an inference setting "
                         f"(recipes/evaluate.py)")
    if trainer.max_steps < 1 or trainer.micro_batch_size < 1:
        raise ValueError("trainer.max_steps and trainer.micro_batch_size must be >= 1")
    check_token_budget(trainer.max_tokens_per_micro_batch, config.model.max_sequence_length)
    data_parallel = None if world_size is None else parallel.data_parallel(world_size)
    if data_parallel is not None and trainer.prompts_per_step % data_parallel:
        raise ValueError(f"trainer.prompts_per_step {trainer.prompts_per_step} is not divisible "
                         f"by data_parallel {data_parallel} (each rank takes whole prompt "
                         f"groups)")


# ----- micro-batches -----

def training_rows(rollouts: RolloutBatch, trainer) -> list[list[int]]:
    """This rank's rollouts grouped into micro-batches: ``trainer.micro_batch_size`` rows in
    order, or packed by ``trainer.max_tokens_per_micro_batch``
    (:func:`~nemo_loop.data.sequences.micro_batch_rows`)."""
    return micro_batch_rows([len(r.prompt) for r in rollouts.rollouts],
                            [len(r.response) for r in rollouts.rollouts],
                            trainer.micro_batch_size, trainer.max_tokens_per_micro_batch)


def dp_mean(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
        tensor /= parallel_state.get_data_parallel_world_size()
    return tensor.item()
