"""Adaptive exit in evaluation: one model over a threshold grid → accuracy vs compute.

With ``generation.exit.policy`` adaptive, every benchmark is evaluated, after its static loop
budgets, once per threshold of ``exit_thresholds`` (or at ``generation.exit.threshold``; the
oracle has none) at R̃ = ``exit_loops`` (default: the largest budget). Per threshold:

* ``avg@n``, ``pass@k``, ``accuracy_by_difficulty`` (as the static budgets);
* ``mean_loops_per_token`` (Σ exit loops / Σ generated tokens), ``mean_loops_per_problem``
  (each problem's mean over its tokens, averaged over problems), ``exit_loop_histogram`` (the
  share of tokens read out at loop 1..R̃);
* ``flops_per_problem``: the model FLOPs the engine ran (:func:`work_per_token`: the prefill at
  R̃ loops, each decode step's loops — all R̃ under ``kv_fill: compute`` or the oracle —, the
  head once per policy read, propagate's K/V projections), and ``flops_ratio`` to the static R̃
  run's;
* ``tokens_per_s``, ``seconds_per_sequence``;
* ``agreement_with_static``: the share of samples whose tokens equal the static R̃ run's (same
  prompt, sample index and seed).

:func:`evaluate_exit_curve` is what a study runner calls per model; :func:`exit_curve` reads
the curve back out of a results dict.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from nemo_loop.evaluation.harness import (
    GenerationRun,
    SampleRecord,
    accuracy_by_difficulty,
    generate_samples,
    generation_flops_per_problem,
    judge,
    score_metrics,
)
from nemo_loop.generation.exit import ExitConfig, work_per_token

log = logging.getLogger(__name__)


def exit_settings(config) -> list[ExitConfig]:
    """The ``generation.exit`` of every run of the sweep: one per ``exit_thresholds`` value, or
    ``generation.exit`` itself when the list is empty."""
    base = config.generation.exit
    if not config.exit_thresholds:
        return [base]
    return [replace(base, threshold=float(threshold)) for threshold in config.exit_thresholds]


def evaluate_exit_curve(name: str, problems, prompts: list[list[int]], *, engine, model, task,
                        prompter, config, static_runs: dict[int, GenerationRun]
                        ) -> tuple[dict, list[SampleRecord]]:
    """The adaptive policy of ``config.generation.exit`` at every threshold of the sweep, at
    R̃ = ``config.exit_budget()`` (whose static run ``static_runs[R̃]`` is the reference)."""
    num_loops = config.exit_budget()
    static = static_runs[num_loops]
    static_flops = generation_flops_per_problem(model.config, prompts, static, num_loops)
    curve, all_records = {}, []
    for exit_config in exit_settings(config):
        sampling = config.sampling.params(prompter.stop_token_ids, config.sampling.seed,
                                          exit=exit_config)
        run = generate_samples(engine, prompts, num_loops, sampling, config.n_samples)
        records, correct_counts = judge(name, problems, run, task, prompter, num_loops,
                                        exit_config.policy, exit_config.threshold)
        metrics = threshold_metrics(config, exit_config, num_loops, problems, prompts, run,
                                    static, correct_counts, task, model.config)
        metrics["flops_ratio"] = metrics["flops_per_problem"] / static_flops \
            if static_flops else float("nan")
        curve[str(exit_config.threshold)] = metrics
        all_records += records
        log.info("%s %s threshold=%s avg@n=%.4f mean loops/token=%.3f flops ratio=%.3f",
                 name, exit_config.policy, exit_config.threshold, metrics["avg@n"],
                 metrics["mean_loops_per_token"], metrics["flops_ratio"])
    base = config.generation.exit
    summary = {"policy": base.policy, "kv_fill": base.kv_fill, "min_loops": base.min_loops,
               "num_loops": num_loops, "static_flops_per_problem": static_flops,
               "thresholds": curve}
    return summary, all_records


def threshold_metrics(config, exit_config: ExitConfig, num_loops: int, problems, prompts,
                      run: GenerationRun, static: GenerationRun, correct_counts: list[int],
                      task, model_config) -> dict:
    n = config.n_samples
    flat = [result for samples in run.completions for result in samples]
    static_flat = [result for samples in static.completions for result in samples]
    tokens = sum(result.length for result in flat)
    loops = [loop for result in flat for loop in result.exit_loops]
    per_problem = []
    for samples in run.completions:
        problem_loops = [loop for result in samples for loop in result.exit_loops]
        if problem_loops:
            per_problem.append(sum(problem_loops) / len(problem_loops))
    histogram = [loops.count(loop) / max(1, len(loops)) for loop in range(1, num_loops + 1)]
    return {
        "threshold": exit_config.threshold,
        "num_loops": num_loops,
        **score_metrics(config, correct_counts),
        "accuracy_by_difficulty": accuracy_by_difficulty(task, problems, correct_counts, n),
        "mean_loops_per_token": sum(loops) / max(1, len(loops)),
        "mean_loops_per_problem": sum(per_problem) / max(1, len(per_problem)),
        "exit_loop_histogram": histogram,
        "flops_per_problem": generation_flops_per_problem(
            model_config, prompts, run, num_loops,
            lambda result: work_per_token(exit_config, result.exit_loops, num_loops)),
        "tokens_per_s": tokens / run.seconds if run.seconds > 0 else float("nan"),
        "seconds_per_sequence": run.seconds / max(1, len(flat)),
        "generation_seconds": run.seconds,
        "mean_generated_tokens": tokens / max(1, len(flat)),
        "agreement_with_static": sum(a.token_ids == b.token_ids
                                     for a, b in zip(flat, static_flat)) / max(1, len(flat)),
    }


def exit_curve(results: dict, benchmark: str) -> list[dict]:
    """The curve of one benchmark in an ``evaluate`` results dict: per threshold (in the
    order evaluated) its accuracy (avg@n), mean loops per token and FLOPs per problem; [] when
    no adaptive policy was evaluated."""
    sweep = results["benchmarks"][benchmark].get("exit")
    if not sweep:
        return []
    return [{"threshold": metrics["threshold"], "accuracy": metrics["avg@n"],
             "mean_loops_per_token": metrics["mean_loops_per_token"],
             "flops_per_problem": metrics["flops_per_problem"],
             "flops_ratio": metrics["flops_ratio"]}
            for metrics in sweep["thresholds"].values()]
