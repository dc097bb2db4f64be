"""lm-eval tasks at every loop budget (and exit threshold): one table and one plot.

Order of work, so that bad input fails before the model is built: resolve the checkpoint and
check the loop budgets against its R, load the tasks offline (unknown names and missing data
are errors naming them), then build the model once and run ``lm_eval.simple_evaluate`` at each
sweep point with an adapter at that budget.

Outputs in ``output_dir``, laid out like ``recipes/evaluate.py``'s: ``results.json`` (every
metric with its standard error, documents, mean loops per token and seconds per task and sweep
point), ``samples.jsonl`` (lm-eval's per-document records), ``results.md`` (the table),
``accuracy_vs_loops.png``, ``metrics.jsonl`` / wandb and ``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from nemo_loop.evaluation.lm_eval_config import LMEvalConfig, exit_policy, with_exit_threshold
from nemo_loop.evaluation.lm_eval_model import build_model, prepare_model
from nemo_loop.evaluation.lm_eval_tasks import load_tasks, output_types, write_shell_game_tasks

RESULTS_JSON, SAMPLES_JSONL, TABLE_MD = "results.json", "samples.jsonl", "results.md"
PLOT = "accuracy_vs_loops.png"
SHELL_GAME_TASKS_DIR = "lm_eval_tasks"


def run_sweep(config: LMEvalConfig) -> dict:
    """Evaluate every task at every sweep point; write and return the results (rank 0; other
    ranks return {})."""
    from nemo_loop.utils.logging import MetricsLogger, is_logging_rank

    started = time.perf_counter()
    # lm-eval's INFO lines repeat at every sweep point; one progress line per point replaces them.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    output_dir = Path(config.output_dir)
    prepared = prepare_model(config.model_args, config.loop_budgets)
    include_paths = list(config.include_paths) + _shell_game_tasks(config, output_dir)
    manager, tasks = load_tasks(config.tasks, include_paths)
    points = config.sweep_points(prepared.max_loops)
    _check_exit_applies(config, output_types(tasks), [loops for loops, _ in points])
    loaded = build_model(prepared, config.model_args)
    logger = MetricsLogger(config.wandb, config, output_dir, _format_point)
    evaluations, samples = [], []
    for index, (loops, threshold) in enumerate(points):
        evaluation, point_samples = evaluate_point(config, loaded, manager, tasks, loops,
                                                   threshold)
        evaluations.append(evaluation)
        samples += point_samples
        # The loop budget is the step, as in evaluate.py (the point's number with thresholds).
        logger.log(index + 1 if config.exit_thresholds else loops, point_metrics(evaluation))
    if not is_logging_rank():
        logger.close()
        return {}
    results = {
        "config": _config_dict(config),
        "checkpoint": loaded.checkpoint,
        "model": {"num_loops": prepared.max_loops, "name": prepared.model_config.name,
                  "vocab_size": prepared.model_config.vocab_size},
        "tokenizer": loaded.prompter.source,
        "include_paths": include_paths,
        "exit_policy": exit_policy(config.model_args.generation),
        "lm_eval_version": _lm_eval_version(),
        "tasks": by_task(evaluations),
        "runtime_s": time.perf_counter() - started,
    }
    plot_path = write_outputs(output_dir, results, samples)
    if logger.run is not None:
        import wandb

        logger.run.log({f"plots/{plot_path.stem}": wandb.Image(str(plot_path))})
    logger.close()
    return results


def _shell_game_tasks(config: LMEvalConfig, output_dir: Path) -> list[str]:
    """The shell-game task folder (written by rank 0) when shell_game_tasks.problems > 0."""
    local = config.shell_game_tasks
    if not local.problems:
        return []
    directory = output_dir / SHELL_GAME_TASKS_DIR
    if torch.distributed.get_rank() == 0:
        write_shell_game_tasks(directory, config.model_args.task.shell_game, local.split,
                               local.problems)
    torch.distributed.barrier()
    return [str(directory.resolve())]


def _check_exit_applies(config: LMEvalConfig, types: dict[str, str], budgets: list[int]
                        ) -> None:
    """Exit policies act on generation (log-likelihood tasks would be scored without them),
    and ``min_loops`` must fit every budget."""
    if exit_policy(config.model_args.generation) == "static":
        return
    config.model_args.generation.exit.check_loops(min(budgets))
    scored = sorted(name for name, kind in types.items() if kind != "generate_until")
    if scored:
        raise ValueError(f"generation.exit.policy={exit_policy(config.model_args.generation)} "
                         f"applies to generation tasks only; {scored} score log-likelihoods "
                         f"(evaluate them in a run with the static policy)")


def evaluate_point(config: LMEvalConfig, loaded, manager, tasks: list, loops: int,
                   threshold: float | None) -> tuple[dict, list[dict]]:
    """All tasks at one budget (and threshold): (per-task metrics, per-document samples)."""
    import lm_eval

    from nemo_loop.evaluation.lm_eval_adapter import NemoLoopLM

    generation = config.model_args.generation if threshold is None else \
        with_exit_threshold(config.model_args.generation, threshold)
    lm = NemoLoopLM(loaded, replace(config.model_args, num_loops=loops, generation=generation))
    started = time.perf_counter()
    output = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, num_fewshot=config.num_fewshot,
        limit=config.limit, bootstrap_iters=config.bootstrap_iters,
        apply_chat_template=config.apply_chat_template, log_samples=True,
        random_seed=config.model_args.seed, numpy_random_seed=config.model_args.seed,
        torch_random_seed=config.model_args.seed,
        fewshot_random_seed=config.model_args.seed)
    seconds = time.perf_counter() - started
    lm.close()
    if output is None:  # not the rank that holds results
        return {}, []
    counts = lm.mean_loops()
    point = {"num_loops": loops, "exit_threshold": threshold, "seconds": seconds, "tasks": {}}
    for name, entry in output["results"].items():
        metrics, stderrs = split_metrics(entry)
        leaves = _leaf_tasks(name, output.get("group_subtasks", {}))
        tokens = sum(counts.get(leaf, {}).get("tokens", 0) for leaf in leaves)
        loop_sum = sum(counts[leaf]["tokens"] * counts[leaf]["mean_loops"]
                       for leaf in leaves if counts.get(leaf, {}).get("tokens"))
        point["tasks"][name] = {
            "metrics": metrics, "stderr": stderrs,
            "primary_metric": next(iter(metrics), None),
            "documents": output.get("n-samples", {}).get(name, {}).get("effective"),
            "tokens": tokens, "mean_loops": loop_sum / tokens if tokens else None}
    return point, [_sample_record(name, loops, threshold, sample)
                   for name, task_samples in (output.get("samples") or {}).items()
                   for sample in task_samples]


def _leaf_tasks(name: str, subtasks: dict[str, list[str]]) -> list[str]:
    """The tasks under a group (recursively through subgroups); a task is its own leaf."""
    children = subtasks.get(name)
    return [leaf for child in children for leaf in _leaf_tasks(child, subtasks)] \
        if children else [name]


def split_metrics(entry: dict) -> tuple[dict, dict]:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s, "alias": ...}`` → (values, stderrs),
    keyed ``metric,filter``; 'N/A' and NaN become None."""
    metrics, stderrs = {}, {}
    for key, value in entry.items():
        if "," not in key:  # alias, name, sample_len
            continue
        metric, filter_name = key.split(",", 1)
        number = _number(value)
        if metric.endswith("_stderr"):
            stderrs[f"{metric.removesuffix('_stderr')},{filter_name}"] = number
        else:
            metrics[key] = number
    return metrics, stderrs


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _sample_record(task: str, loops: int, threshold: float | None, sample: dict) -> dict:
    record = {"task": task, "num_loops": loops, "exit_threshold": threshold}
    record.update({key: sample.get(key) for key in
                   ("doc_id", "target", "arguments", "filtered_resps", "filter")})
    record.update({metric: sample.get(metric) for metric in sample.get("metrics", [])})
    return record


def by_task(evaluations: list[dict]) -> dict:
    """{task: [one entry per sweep point, with num_loops and exit_threshold]}."""
    tasks: dict[str, list] = {}
    for point in evaluations:
        for name, entry in point["tasks"].items():
            tasks.setdefault(name, []).append({
                "num_loops": point["num_loops"], "exit_threshold": point["exit_threshold"],
                "seconds": point["seconds"], **entry})
    return tasks


# ----- outputs -----

def write_outputs(output_dir: Path, results: dict, samples: list[dict]) -> Path:
    """results.json, samples.jsonl, results.md and the plot (returned)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULTS_JSON).write_text(json.dumps(results, indent=2, default=_jsonable))
    with (output_dir / SAMPLES_JSONL).open("w") as handle:
        for record in samples:
            handle.write(json.dumps(record, default=_jsonable) + "\n")
    (output_dir / TABLE_MD).write_text(markdown_table(results))
    return plot_accuracy_vs_loops(output_dir / PLOT, results)


def _jsonable(value):
    return float(value) if hasattr(value, "__float__") else str(value)


def _config_dict(config: LMEvalConfig) -> dict:
    from nemo_loop.config import to_dict

    return to_dict(config)


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict) -> str:
    """One row per task × metric × sweep point."""
    with_exit = results["exit_policy"] != "static"
    header = ["task", "metric", "loops R̃"] + (["exit threshold"] if with_exit else []) + \
        ["value", "± stderr", "mean loops / token", "documents", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, entries in results["tasks"].items():
        for entry in entries:
            for metric, value in entry["metrics"].items():
                name, filter_name = metric.split(",", 1)
                row = [task, name if filter_name == "none" else f"{name} ({filter_name})",
                       str(entry["num_loops"])]
                row += [_fmt(entry["exit_threshold"], 2)] if with_exit else []
                row += [_fmt(value), _fmt(entry["stderr"].get(metric)),
                        _fmt(entry["mean_loops"], 2), str(entry["documents"] or "–"),
                        _fmt(entry["seconds"], 1)]
                lines.append("| " + " | ".join(row) + " |")
    checkpoint = results["checkpoint"]
    config = results["config"]
    return "\n".join([
        "# lm-eval results", "",
        f"Model: `{checkpoint['path']}` (step {checkpoint['step']}, sha256 "
        f"{checkpoint['sha256_metadata'][:12]}); R = {results['model']['num_loops']} loops; "
        f"tokenizer {results['tokenizer']}.  ",
        f"lm-eval {results['lm_eval_version']}; chat template: "
        f"{'yes' if config['apply_chat_template'] else 'no'}; few-shot: "
        f"{config['num_fewshot'] if config['num_fewshot'] is not None else 'task default'}; "
        f"exit policy: {results['exit_policy']}. Seconds: all tasks of one sweep point.", "",
        *lines, ""])


def plot_accuracy_vs_loops(path: Path, results: dict) -> Path:
    """Each task's first metric against mean loops per token (= R̃ at a static budget)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for index, (task, entries) in enumerate(results["tasks"].items()):
        metric = entries[0]["primary_metric"]
        if metric is None:
            continue
        points = [(e["mean_loops"], e["metrics"].get(metric), e["exit_threshold"])
                  for e in entries if e["mean_loops"] is not None]
        static = sorted((x, y) for x, y, t in points if t is None and y is not None)
        exits = [(x, y) for x, y, t in points if t is not None and y is not None]
        colour = axes.plot([], [])[0].get_color()  # the next colour of the cycle
        name = f"{task} ({metric.split(',')[0]})"
        if static:  # markers and dashes tell apart tasks whose curves coincide
            axes.plot(*zip(*static), marker="osD^v"[index % 5], color=colour, label=name,
                      linestyle=("-", "--", ":")[index % 3], markersize=7 - index % 3)
        if exits:
            axes.scatter(*zip(*exits), marker="x", color=colour, label=f"{name}, exit policy")
    axes.set_xlabel("mean loops per token (static: loop budget R̃)")
    axes.set_ylabel("score")
    axes.set_xticks(range(1, results["model"]["num_loops"] + 1))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title("lm-eval tasks vs loops")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def point_metrics(point: dict) -> dict:
    """{"<task>/<metric>": value, "<task>/mean_loops": ...} of one sweep point."""
    flat = {"num_loops": point.get("num_loops"), "exit_threshold": point.get("exit_threshold")}
    for task, entry in point.get("tasks", {}).items():
        flat.update({f"{task}/{metric}": value for metric, value in entry["metrics"].items()})
        flat[f"{task}/mean_loops"] = entry["mean_loops"]
    return flat


def _format_point(step: int, metrics: dict) -> str:
    scores = " ".join(f"{key.split('/')[0]} {key.split('/')[1].split(',')[0]}={value:.3f}"
                      for key, value in metrics.items()
                      if "/" in key and not key.endswith("/mean_loops") and value is not None)
    threshold = metrics["exit_threshold"]
    return (f"loops {metrics['num_loops']}"
            + ("" if threshold is None else f" threshold {threshold}") + f" | {scores}")
