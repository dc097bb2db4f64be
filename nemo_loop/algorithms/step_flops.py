"""Model FLOPs of one training step of each algorithm, with achieved FLOP/s and MFU.

Each algorithm's step ends with one call here; the metrics it returns are logged with the
step's others:

* ``flops``: the step's model FLOPs over all data-parallel ranks (:mod:`nemo_loop.utils.flops`:
  real tokens only, backward = 2 × forward), and ``flops_<phase>`` per phase: ``generate``
  (rollouts at R̃ with a KV cache), ``teacher`` (LLOPSD's teacher forward through max φ(r)
  loops, its head on the response at the mapped loops), ``reference`` (the frozen reference's
  forward at R̃ for the KL), ``student``/``policy`` (forward + backward at R̃, the head on the
  response at the loops the loss reads);
* ``achieved_flops_per_s_per_device`` = flops / (step seconds × world size), and ``mfu`` when
  ``trainer.peak_flops_per_s`` (one device's peak, e.g. 989.4e12 for an H100's dense bf16) is set.

Tensor-parallel ranks of one data-parallel rank share its rollouts, so the FLOPs of the rollouts
each DP rank holds are summed over the data-parallel group only.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from nemo_loop.utils.flops import (
    LoopShape,
    forward_flops,
    generation_flops,
    throughput,
    training_flops,
)


def step_metrics(phases: dict[str, float], seconds: float, peak_flops_per_s: float | None
                 ) -> dict:
    """This rank's per-phase FLOPs → the step's global FLOPs, per phase, and throughput."""
    names = list(phases)
    values = torch.tensor([float(phases[name]) for name in names], dtype=torch.float64)
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
    metrics = {f"flops_{name}": value for name, value in zip(names, values.tolist())}
    metrics["flops"] = float(values.sum())
    metrics.update(throughput(metrics["flops"], seconds, torch.distributed.get_world_size(),
                              peak_flops_per_s))
    return metrics


def _generate(shape: LoopShape, rollouts, loops: int) -> int:
    return sum(generation_flops(shape, len(r.prompt), len(r.response), loops)
               for r in rollouts.rollouts)


def llopsd(config, rollouts, teacher_prompts: list[list[int]], teacher_loops: list[int],
           seconds: float) -> dict:
    """Rollouts at R̃; the teacher on context + prompt + response through max φ(r) loops, its
    head on the response at each mapped loop; the student's forward + backward at R̃ with the
    head on the response at all R̃ loops."""
    shape, loops = LoopShape.of(config.model), config.rollout.student_loops
    teacher = student = 0
    for rollout, teacher_prompt in zip(rollouts.rollouts, teacher_prompts):
        length = len(rollout.response)
        teacher += forward_flops(shape, len(teacher_prompt) + length, max(teacher_loops),
                                 readouts=length * len(teacher_loops))
        student += training_flops(shape, len(rollout.prompt) + length, loops,
                                  readouts=length * loops)
    phases = {"generate": _generate(shape, rollouts, loops), "teacher": teacher,
              "student": student}
    return step_metrics(phases, seconds, config.trainer.peak_flops_per_s)


def policy(config, rollouts, logit_loops: list[int], uses_reference: bool,
           seconds: float) -> dict:
    """GRPO, RLTT, OISD: rollouts at R̃; the frozen reference's forward at R̃ (KL); then
    ``trainer.updates_per_batch`` forward + backward passes at R̃ with the head on the response
    at the loops the objective reads."""
    shape, loops = LoopShape.of(config.model), config.rollout.student_loops
    reference = update = 0
    for rollout in rollouts.rollouts:
        tokens, length = len(rollout.prompt) + len(rollout.response), len(rollout.response)
        if uses_reference:
            reference += forward_flops(shape, tokens, loops, readouts=length)
        update += training_flops(shape, tokens, loops, readouts=length * len(logit_loops))
    phases = {"generate": _generate(shape, rollouts, loops), "reference": reference,
              "policy": update * config.trainer.updates_per_batch}
    return step_metrics(phases, seconds, config.trainer.peak_flops_per_s)


def teacher_forced(config, micro_batches: list[dict], loops: int, logit_loops: int | None,
                   seconds: float) -> dict:
    """Supervised steps on teacher-forced rows (``row_lengths``: the input tokens of each row,
    each predicting the next): forward + backward at ``loops`` loops, the head at
    ``logit_loops`` loops on every target token (``loss_mask`` > 0), or on every input token
    at every loop when ``logit_loops`` is None (pretraining reads all of them)."""
    shape = LoopShape.of(config.model)
    total = 0
    for micro_batch in micro_batches:
        lengths = micro_batch["row_lengths"].tolist()
        targets = (micro_batch["loss_mask"] > 0).sum(1).tolist()
        for tokens, target_tokens in zip(lengths, targets):
            readouts = tokens * loops if logit_loops is None else target_tokens * logit_loops
            total += training_flops(shape, tokens, loops, readouts)
    return step_metrics({"train": total}, seconds, config.trainer.peak_flops_per_s)


def exit_gate(config, micro_batches: list[dict], seconds: float) -> dict:
    """Stage II gate training: the frozen model's forward through all R loops with the head at
    every loop and position (the per-loop losses); the gate's own backward is O(h) per token
    and left out."""
    shape, loops = LoopShape.of(config.model), config.model.num_loops
    total = sum(forward_flops(shape, tokens, loops, tokens * loops)
                for micro_batch in micro_batches for tokens in micro_batch["row_lengths"].tolist())
    return step_metrics({"forward": total}, seconds, config.trainer.peak_flops_per_s)


def looprpt(config, micro_batches: list[dict], seconds: float) -> dict:
    """LoopRPT on teacher-forced rows (``row_lengths``): the EMA teacher's forward through all
    R loops with the head at every loop and position, and the student's forward + backward over
    the clean rows and their G noisy copies, the head likewise."""
    shape, loops = LoopShape.of(config.model), config.model.num_loops
    copies = 1 + config.looprpt.num_rollouts
    teacher = student = 0
    for micro_batch in micro_batches:
        for tokens in micro_batch["row_lengths"].tolist():
            teacher += forward_flops(shape, tokens, loops, readouts=tokens * loops)
            student += copies * training_flops(shape, tokens, loops, readouts=tokens * loops)
    return step_metrics({"teacher": teacher, "student": student}, seconds,
                        config.trainer.peak_flops_per_s)
