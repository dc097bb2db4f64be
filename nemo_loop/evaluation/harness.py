"""The evaluation loop: benchmarks × loop budgets → samples, verdicts, metrics.

For every benchmark and loop budget R̃, each problem's prompt is sampled ``n_samples`` times
with the native engine at ``num_loops=R̃``. Every sample is checked against the reference; then
per budget: pass@k, avg@n, accuracy per difficulty level (when the task has levels: the shell
game's number of swaps), the mean entropy of every loop's next-token distribution along the
generated tokens (R̃ values: intermediate loops included), generation FLOPs per problem,
generation wall time per sequence, tokens/s, and the speed-up over the full R loops. The budgets
run every token at R̃ loops (static); an adaptive ``generation.exit`` policy is evaluated after
them, over its threshold grid (:mod:`nemo_loop.evaluation.exit_sweep`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from nemo_loop.data.chat import ChatTokenizer
from nemo_loop.data.prompts import PromptRecord, load_prompt_set
from nemo_loop.evaluation.config import EvalConfig
from nemo_loop.evaluation.metrics import avg_at_n, mean_pass_at_k, usable_ks
from nemo_loop.generation.engine import GenerationResult, SamplingParams
from nemo_loop.tasks import Task, build_task

log = logging.getLogger(__name__)
# Logit elements materialised at once by the entropy pass (~256 MiB of fp32).
ENTROPY_CHUNK_ELEMENTS = 1 << 26


@dataclass
class SampleRecord:
    benchmark: str
    problem_id: str
    num_loops: int
    sample_index: int
    reference: str
    response: str
    extracted: str | None
    correct: bool
    verify_error: str | None
    num_tokens: int
    finish_reason: str
    # Adaptive exit: the policy and threshold that generated the sample, and each token's loop.
    exit_policy: str = "static"
    exit_threshold: float | None = None
    exit_loops: list[int] | None = None


@dataclass
class GenerationRun:
    completions: list[list[GenerationResult]]  # [problem][sample]
    seconds: float


# ----- generation (the one place that talks to the engine) -----

def generate_samples(engine, prompts: list[list[int]], num_loops: int,
                     sampling: SamplingParams, n_samples: int) -> GenerationRun:
    """``n_samples`` continuations of every prompt at ``num_loops`` loops, with wall time."""
    repeated = [prompt for prompt in prompts for _ in range(n_samples)]
    started = time.perf_counter()
    flat = engine.generate(repeated, num_loops=num_loops, sampling=sampling)
    seconds = time.perf_counter() - started
    grouped = [flat[i * n_samples:(i + 1) * n_samples] for i in range(len(prompts))]
    return GenerationRun(grouped, seconds)


# ----- per-loop entropy -----

@torch.no_grad()
def loop_entropies(model, prompts: list[list[int]], continuations: list[list[int]],
                   num_loops: int, batch_size: int) -> torch.Tensor:
    """[num_sequences, num_loops]: per loop, the mean entropy (nats) of its next-token
    distribution over the positions that predicted the generated tokens (NaN: none generated).

    The engine only reads out the final loop, so this re-runs prompt + continuation through all
    ``num_loops`` loops in one full forward; right padding is harmless under the causal mask.
    """
    result = torch.full((len(prompts), num_loops), float("nan"))
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        result[start:stop] = _batch_entropies(model, prompts[start:stop],
                                              continuations[start:stop], num_loops)
    return result


def _batch_entropies(model, prompts, continuations, num_loops: int) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    sequences = [p + c for p, c in zip(prompts, continuations)]
    width = max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, :len(sequence)] = torch.tensor(sequence)
    readouts = list(model.run_loops(tokens, num_loops))  # num_loops × [s, b, h]
    # Position len(prompt)-1+t predicts generated token t.
    generated = max(len(c) for c in continuations)
    offsets = torch.arange(generated).unsqueeze(1)  # [G, 1]
    first = torch.tensor([len(p) - 1 for p in prompts]).unsqueeze(0)  # [1, b]
    lengths = torch.tensor([len(c) for c in continuations]).unsqueeze(0)
    positions = (first + offsets).clamp(max=width - 1)  # [G, b]
    valid = offsets < lengths  # [G, b]
    entropy_sum = torch.zeros(num_loops, len(sequences))
    vocab = model.config.vocab_size
    chunk = max(1, ENTROPY_CHUNK_ELEMENTS // (len(sequences) * vocab))
    for begin in range(0, generated, chunk):
        rows = positions[begin:begin + chunk]
        index = rows.unsqueeze(-1).expand(-1, -1, readouts[0].shape[-1])
        selected = [readout.gather(0, index) for readout in readouts]
        logits = model.logits(selected)  # [n, g, b, V/TP]
        logits = gather_from_tensor_model_parallel_region(logits).float()  # [n, g, b, V]
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # [n, g, b]
        entropy_sum += (entropy * valid[begin:begin + chunk]).sum(1)
    counts = lengths[0].float()
    return (entropy_sum / counts).T  # NaN where nothing was generated


# ----- one benchmark at one budget -----

def evaluate_budget(name: str, problems: list[PromptRecord], prompts: list[list[int]], *, model,
                    engine, task: Task, prompter: ChatTokenizer, config: EvalConfig,
                    num_loops: int) -> tuple[dict, list[SampleRecord], GenerationRun]:
    """Every problem ``n_samples`` times at R̃ = ``num_loops`` loops for every token (static,
    whatever ``generation.exit`` says: these are the fixed-budget reference points)."""
    sampling = config.sampling.params(prompter.stop_token_ids, config.sampling.seed)
    n = config.n_samples
    run = generate_samples(engine, prompts, num_loops, sampling, n)
    flat = [result for samples in run.completions for result in samples]
    repeated_prompts = [prompt for prompt in prompts for _ in range(n)]
    entropies = loop_entropies(model, repeated_prompts, [r.token_ids for r in flat], num_loops,
                               config.entropy_batch_size)
    records, correct_counts = judge(name, problems, run, task, prompter, num_loops)
    metrics = budget_metrics(config, num_loops, correct_counts, flat, entropies, run.seconds,
                             records)
    metrics["accuracy_by_difficulty"] = accuracy_by_difficulty(task, problems, correct_counts, n)
    metrics["flops_per_problem"] = generation_flops_per_problem(model.config, prompts, run,
                                                                num_loops)
    return metrics, records, run


def judge(name: str, problems: list[PromptRecord], run: GenerationRun, task: Task,
          prompter: ChatTokenizer, num_loops: int, exit_policy: str = "static",
          exit_threshold: float | None = None) -> tuple[list[SampleRecord], list[int]]:
    """Every sample decoded and checked: its record, and the correct samples per problem."""
    records, correct_counts = [], []
    for problem, samples in zip(problems, run.completions):
        correct = 0
        for index, result in enumerate(samples):
            response = prompter.decode(result.token_ids)
            verdict = task.check(response, problem.answer)
            correct += verdict.correct
            records.append(SampleRecord(
                benchmark=name, problem_id=problem.id, num_loops=num_loops, sample_index=index,
                reference=problem.answer, response=response, extracted=verdict.extracted,
                correct=verdict.correct, verify_error=verdict.error,
                num_tokens=result.length, finish_reason=result.finish_reason,
                exit_policy=exit_policy, exit_threshold=exit_threshold,
                exit_loops=None if exit_policy == "static" else list(result.exit_loops)))
        correct_counts.append(correct)
    return records, correct_counts


def accuracy_by_difficulty(task: Task, problems: list[PromptRecord], correct_counts: list[int],
                           n_samples: int) -> dict[str, dict]:
    """{level: {"problems": count, "avg@n": accuracy}} for the task's difficulty levels ({} when
    it has none), levels in increasing order."""
    levels: dict[int, list[int]] = {}
    for problem, correct in zip(problems, correct_counts):
        level = task.difficulty(problem.problem)
        if level is not None:
            levels.setdefault(level, []).append(correct)
    return {str(level): {"problems": len(counts), "avg@n": avg_at_n(counts, n_samples)}
            for level, counts in sorted(levels.items())}


def generation_flops_per_problem(model_config, prompts: list[list[int]], run: GenerationRun,
                                 num_loops: int, work_per_token=None) -> float:
    """Model FLOPs of every sample of a problem, averaged over problems. ``work_per_token``
    (result → loops run, head evaluations, propagated flags per token): adaptive exit; None:
    every token at ``num_loops`` loops, the head once."""
    from nemo_loop.utils.flops import LoopShape, adaptive_generation_flops

    shape = LoopShape.of(model_config)
    total = 0
    for prompt, samples in zip(prompts, run.completions):
        for result in samples:
            if work_per_token is None:
                work = ([num_loops] * result.length, [1] * result.length, [])
            else:
                work = work_per_token(result)
            total += adaptive_generation_flops(shape, len(prompt), num_loops, *work)
    return total / max(1, len(prompts))


def score_metrics(config: EvalConfig, correct_counts: list[int]) -> dict:
    """Problems, samples per problem, avg@n and pass@k of one run's correct-sample counts."""
    n = config.n_samples
    return {"num_problems": len(correct_counts), "n_samples": n,
            "avg@n": avg_at_n(correct_counts, n),
            "pass@k": {str(k): mean_pass_at_k(correct_counts, n, k)
                       for k in usable_ks(config.pass_at_k, n)}}


def budget_metrics(config: EvalConfig, num_loops: int, correct_counts: list[int],
                   results: list[GenerationResult], entropies: torch.Tensor, seconds: float,
                   records: list[SampleRecord]) -> dict:
    tokens = sum(r.length for r in results)
    per_loop = torch.nanmean(entropies, dim=0) if len(results) else torch.full((num_loops,),
                                                                                float("nan"))
    return {
        "num_loops": num_loops,
        **score_metrics(config, correct_counts),
        "entropy_per_loop": [float(value) for value in per_loop],
        "seconds_per_sequence": seconds / max(1, len(results)),
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "generation_seconds": seconds,
        "mean_generated_tokens": tokens / max(1, len(results)),
        "stopped_fraction": sum(r.finish_reason == "stop" for r in results) / max(1,
                                                                                  len(results)),
        "no_answer_fraction": sum(r.extracted is None for r in records) / max(1, len(records)),
        "verify_errors": sum(r.verify_error is not None for r in records),
    }


def add_speedups(budget_results: dict[int, dict], full_loops: int) -> None:
    """Speed-up of each budget over R loops (over the largest evaluated budget if R was not)."""
    reference = full_loops if full_loops in budget_results else max(budget_results)
    reference_time = budget_results[reference]["seconds_per_sequence"]
    for metrics in budget_results.values():
        metrics["speedup_reference_loops"] = reference
        metrics["speedup"] = reference_time / metrics["seconds_per_sequence"] \
            if metrics["seconds_per_sequence"] > 0 else float("nan")


# ----- the whole run -----

def prompts_that_fit(problems: list[PromptRecord], prompter: ChatTokenizer,
                     max_sequence_length: int
                     ) -> tuple[list[PromptRecord], list[list[int]], list[str]]:
    """Encoded prompts; a problem whose prompt leaves no room for generation is skipped (a long
    prompt that does fit generates until max_sequence_length)."""
    kept, prompts, skipped = [], [], []
    for problem in problems:
        ids = prompter.encode_prompt(problem.problem)
        if len(ids) >= max_sequence_length:
            skipped.append(problem.id)
            continue
        kept.append(problem)
        prompts.append(ids)
    return kept, prompts, skipped


def run_evaluation(config: EvalConfig, model, prompter: ChatTokenizer,
                   on_budget=None) -> tuple[dict, list[SampleRecord]]:
    """Every benchmark at every loop budget. ``on_budget(name, metrics)`` sees each result."""
    from nemo_loop.generation.backend import build_engine

    engine = build_engine(config.generation, model, max_batch_size=config.generation_batch_size)
    task = build_task(config.task)
    summary, all_records = {}, []
    for spec in config.benchmark_specs():
        problems = load_prompt_set(spec, config.data_root)
        kept, prompts, skipped = prompts_that_fit(
            problems, prompter, model.config.max_sequence_length)
        if skipped:
            log.warning("%s: %d of %d prompts exceed model.max_sequence_length=%d and are "
                        "skipped", spec.name, len(skipped), len(problems),
                        model.config.max_sequence_length)
        budgets, static_runs = {}, {}
        for num_loops in config.budgets() if kept else []:
            metrics, records, static_runs[num_loops] = evaluate_budget(
                spec.name, kept, prompts, model=model, engine=engine, task=task,
                prompter=prompter, config=config, num_loops=num_loops)
            budgets[num_loops] = metrics
            all_records += records
            log.info("%s R̃=%d avg@n=%.4f verify_errors=%d %.2fs/seq", spec.name, num_loops,
                     metrics["avg@n"], metrics["verify_errors"], metrics["seconds_per_sequence"])
        if budgets:
            add_speedups(budgets, model.config.num_loops)
        if on_budget is not None:
            for metrics in budgets.values():
                on_budget(spec.name, metrics)
        summary[spec.name] = {"spec": asdict(spec), "num_problems_loaded": len(problems),
                              "skipped_prompt_too_long": skipped,
                              "budgets": {str(r): m for r, m in budgets.items()}}
        if config.generation.exit.adaptive and kept:
            from nemo_loop.evaluation.exit_sweep import evaluate_exit_curve

            summary[spec.name]["exit"], records = evaluate_exit_curve(
                spec.name, kept, prompts, engine=engine, model=model, task=task,
                prompter=prompter, config=config, static_runs=static_runs)
            all_records += records
    engine.close()
    return summary, all_records


def evaluate(config: EvalConfig) -> dict:
    """Load the model, run every benchmark × budget, and write results, table and plots."""
    from pathlib import Path

    from nemo_loop.config import to_dict
    from nemo_loop.evaluation import report
    from nemo_loop.evaluation.model_loading import (
        build_eval_model,
        checkpoint_identity,
        locate_checkpoint,
        stored_model_config,
    )
    from nemo_loop.utils.distributed import ParallelConfig, initialize_model_parallel
    from nemo_loop.utils.logging import is_logging_rank

    started = time.perf_counter()
    location = locate_checkpoint(config.checkpoint, config.checkpoint_step)
    stored = stored_model_config(location)
    if stored is not None:
        config.model, source = stored
        log.info("model architecture from %s (the eval config's model section is ignored)",
                 source)
        config.validate()
    initialize_model_parallel(ParallelConfig(config.tensor_parallel), seed=config.sampling.seed)
    prompter = build_task(config.task).tokenizer(config.data_root)
    prompter.check_fits(config.model.vocab_size)
    model = build_eval_model(config.model, location, config.tensor_parallel)
    summary, records = run_evaluation(config, model, prompter)
    results = {
        "config": to_dict(config),
        "checkpoint": checkpoint_identity(location, config.sampling.seed),
        "model": {"num_loops": config.model.num_loops, "name": config.model.name,
                  "vocab_size": config.model.vocab_size},
        "tokenizer": prompter.source,
        "stop_token_ids": prompter.stop_token_ids,
        "loop_budgets": config.budgets(),
        "benchmarks": summary,
        "runtime_s": time.perf_counter() - started,
    }
    output_dir = Path(config.output_dir)
    plot_paths = []
    if is_logging_rank():
        report.write_results(output_dir, results, records)
        report.write_markdown(output_dir, results)
        plot_paths = report.plot_all(output_dir, results)
    report.log_metrics(config, output_dir, results, plot_paths)
    return results
