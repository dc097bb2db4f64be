"""The compression experiment's report: ``experiment.json``, ``report.md`` and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

REPORT_MD = "report.md"
PLOT_PNG = "accuracy_vs_loops.png"
SUMMARY_JSON = "experiment.json"


def standard_error(accuracy: float, count: int) -> float:
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / count)


def accuracy_table(summary: dict) -> str:
    """Markdown: one row per model, one column per loop count, ± one standard error."""
    accuracies = summary["accuracy_per_loop"]
    loops = len(next(iter(accuracies.values())))
    count = summary["test_problems"]
    header = ["model"] + [f"{r} loop{'s' if r > 1 else ''}" for r in range(1, loops + 1)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, values in accuracies.items():
        cells = [f"{a:.3f} ± {standard_error(a, count):.3f}" for a in values]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def verdict(summary: dict) -> str:
    """How the students compare at R̃ loops, against each other and the R-loop teacher."""
    accuracies = summary["accuracy_per_loop"]
    student_loops, full = summary["student_loops"], summary["num_loops"]
    count = summary["test_problems"]
    before = accuracies["pretrained"][student_loops - 1]
    teacher = accuracies["pretrained"][full - 1]
    lines = [f"At R̃ = {student_loops} loops the pretrained model scores {before:.3f}; with all "
             f"R = {full} loops it scores {teacher:.3f}."]
    students = {name: values[student_loops - 1] for name, values in accuracies.items()
                if name != "pretrained"}
    gap = teacher - before
    for name, value in students.items():
        closed = f", {100 * (value - before) / gap:.0f}% of the gap to R loops closed" \
            if abs(gap) > 1e-9 else ""
        lines.append(f"- {name}: {value:.3f} at R̃ = {student_loops}{closed}.")
    if "llopsd" in students and "terminal_only" in students:
        difference = students["llopsd"] - students["terminal_only"]
        error = math.hypot(standard_error(students["llopsd"], count),
                           standard_error(students["terminal_only"], count))
        outcome = "beat" if difference > 2 * error else "did worse than" \
            if difference < -2 * error else "did not clearly beat (within noise of)"
        lines.append(f"\nLLOPSD {outcome} terminal-only at R̃ = {student_loops}: "
                     f"{difference:+.3f} (two standard errors of the difference: "
                     f"{2 * error:.3f}, {count} test problems).")
    return "\n".join(lines)


def phase_table(summary: dict) -> str:
    lines = ["| phase | wall-clock (s) |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in summary["phase_seconds"].items()]
    return "\n".join(lines)


def describe_student(name: str, student: dict) -> str:
    """One line: the algorithm, its steps and batch, and for LLOPSD the loss and teacher."""
    config, algorithm = student["config"], student["algorithm"]
    trainer = config["trainer"]
    batch = trainer.get("prompts_per_step", trainer.get("examples_per_step"))
    line = f"- `{name}`: {algorithm}, {trainer['max_steps']} steps × {batch} prompts"
    if algorithm == "llopsd":
        loss, teacher = config["loss"], config["teacher"]
        line += (f"; mapping {loss['mapping']}, weighting {loss['weighting']}, divergence "
                 f"{loss['divergence']}; teacher: the {teacher['mode']} model at R loops, "
                 f"context {teacher['context']['kind']}")
    return line


def markdown(summary: dict) -> str:
    task = summary["config"]["task"]["shell_game"]
    model = summary["config"]["model"]
    split = summary.get("evaluation_split", "test")
    students = "\n".join(describe_student(name, student)
                         for name, student in summary["students"].items())
    return "\n".join([
        "# Loop compression on the shell game", "",
        f"Task: {task['num_cups']} cups, {task['num_swaps']} swaps per held-out game (training "
        f"games: {task['min_swaps']}–{task['num_swaps']} swaps); "
        f"{summary['test_problems']} held-out {split} games, greedy decoding, exact match.  ",
        f"Model: {model['num_layers']} shared layers × R = {model['num_loops']} loops, hidden "
        f"{model['hidden_size']}; pretrained with Ouro's loss for "
        f"{summary['config']['pretrain']['trainer']['max_steps']} steps.  ",
        f"Compression from the pretrained checkpoint to R̃ = {summary['student_loops']}:",
        students, "",
        f"## {split.capitalize()} accuracy per loop count", "", accuracy_table(summary), "",
        f"![accuracy vs loops]({PLOT_PNG})", "", verdict(summary), "",
        "## Wall-clock", "", phase_table(summary), ""])


def plot(path: Path, summary: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4))
    count = summary["test_problems"]
    for name, values in summary["accuracy_per_loop"].items():
        loops = list(range(1, len(values) + 1))
        errors = [standard_error(a, count) for a in values]
        axes.errorbar(loops, values, yerr=errors, marker="o", capsize=3, label=name)
    axes.axvline(summary["student_loops"], color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("loops at inference")
    axes.set_ylabel("test accuracy")
    axes.set_xticks(loops)
    axes.set_ylim(0, 1.02)
    axes.set_title("Shell game: accuracy vs loops")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write(root: Path, summary: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, default=float))
    plot(root / PLOT_PNG, summary)
    path = root / REPORT_MD
    path.write_text(markdown(summary))
    return path
