"""Evaluation outputs: results JSON, per-sample JSONL, a markdown table, PNG plots, wandb."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

RESULTS_JSON = "results.json"
SAMPLES_JSONL = "samples.jsonl"
TABLE_MD = "results.md"


def write_results(output_dir: Path, results: dict, records) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULTS_JSON).write_text(json.dumps(results, indent=2, default=_jsonable))
    with (output_dir / SAMPLES_JSONL).open("w") as handle:
        for record in records:
            handle.write(json.dumps(asdict(record)) + "\n")


def _jsonable(value):
    return float(value) if hasattr(value, "__float__") else str(value)


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def markdown_table(results: dict) -> str:
    """One row per benchmark × loop budget."""
    all_ks = sorted({int(k) for bench in results["benchmarks"].values()
                     for metrics in bench["budgets"].values() for k in metrics["pass@k"]})
    header = (["benchmark", "loops", "problems", "avg@n"] + [f"pass@{k}" for k in all_ks]
              + ["entropy per loop (nats)", "s/seq", "tok/s", "speedup", "verify errors"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, bench in results["benchmarks"].items():
        for loops, metrics in sorted(bench["budgets"].items(), key=lambda item: int(item[0])):
            pass_cells = [_fmt(metrics["pass@k"].get(str(k))) for k in all_ks]
            entropies = " / ".join(_fmt(h, 2) for h in metrics["entropy_per_loop"])
            speedup = f"{_fmt(metrics['speedup'], 2)}× vs R={metrics['speedup_reference_loops']}"
            row = ([name, loops, str(metrics["num_problems"]), _fmt(metrics["avg@n"])]
                   + pass_cells + [entropies, _fmt(metrics["seconds_per_sequence"]),
                                   _fmt(metrics["tokens_per_s"], 1), speedup,
                                   str(metrics["verify_errors"])])
            lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    checkpoint = results["checkpoint"]
    source = "randomly initialised model (checkpoint: null)" if checkpoint["random_init"] \
        else f"`{checkpoint['path']}` (step {checkpoint['step']}, " \
             f"sha256 {checkpoint['sha256_metadata'][:12]})"
    sampling = results["config"]["sampling"]
    return "\n".join([
        "# LoopLM evaluation", "",
        f"Model: {source}; R = {results['model']['num_loops']} loops.  ",
        f"Sampling: n = {results['config']['n_samples']}, temperature {sampling['temperature']},"
        f" top-p {sampling['top_p']}, max new tokens {sampling['max_new_tokens']}.", "",
        *lines, ""])


def write_markdown(output_dir: Path, results: dict) -> Path:
    path = output_dir / TABLE_MD
    path.write_text(markdown_table(results))
    return path


# ----- plots -----

def plot_all(output_dir: Path, results: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    paths = [_plot_accuracy_vs_loops(output_dir, results)]
    for name, bench in results["benchmarks"].items():
        if bench["budgets"]:
            paths.append(_plot_pass_at_k(output_dir, name, bench["budgets"]))
            paths.append(_plot_entropy_per_loop(output_dir, name, bench["budgets"]))
    return paths


def _sorted_budgets(budgets: dict) -> list[tuple[int, dict]]:
    return sorted(((int(r), m) for r, m in budgets.items()), key=lambda item: item[0])


def _plot_accuracy_vs_loops(output_dir: Path, results: dict) -> Path:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, bench in results["benchmarks"].items():
        budgets = _sorted_budgets(bench["budgets"])
        if not budgets:
            continue
        loops = [r for r, _ in budgets]
        line, = axes.plot(loops, [m["avg@n"] for _, m in budgets], marker="o",
                          label=f"{name} avg@n")
        top_k = max(int(k) for k in budgets[0][1]["pass@k"])
        axes.plot(loops, [m["pass@k"][str(top_k)] for _, m in budgets], marker="s",
                  linestyle="--", color=line.get_color(), label=f"{name} pass@{top_k}")
    axes.set_xlabel("loop budget R̃")
    axes.set_ylabel("accuracy")
    axes.set_ylim(-0.02, 1.02)
    axes.set_xticks(range(1, results["model"]["num_loops"] + 1))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title("Accuracy vs loops")
    return _save(figure, output_dir / "accuracy_vs_loops.png")


def _plot_pass_at_k(output_dir: Path, name: str, budgets: dict) -> Path:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for loops, metrics in _sorted_budgets(budgets):
        ks = sorted(int(k) for k in metrics["pass@k"])
        axes.plot(ks, [metrics["pass@k"][str(k)] for k in ks], marker="o", label=f"R̃={loops}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("k")
    axes.set_ylabel("pass@k")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(f"{name}: pass@k per loop budget")
    return _save(figure, output_dir / f"pass_at_k_{name}.png")


def _plot_entropy_per_loop(output_dir: Path, name: str, budgets: dict) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(6, 4))
    for loops, metrics in _sorted_budgets(budgets):
        entropies = metrics["entropy_per_loop"]
        axes.plot(range(1, len(entropies) + 1), entropies, marker="o", label=f"R̃={loops}")
    axes.set_xlabel("loop")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("mean next-token entropy (nats)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(f"{name}: entropy of each loop along generated tokens")
    return _save(figure, output_dir / f"entropy_per_loop_{name}.png")


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ----- wandb / metrics.jsonl -----

def flat_metrics_per_budget(results: dict) -> dict[int, dict]:
    """{loop budget: {"<benchmark>/<metric>": value}}: one logging step per budget, so that
    every benchmark's curve shares the loop-budget axis."""
    per_budget: dict[int, dict] = {}
    for name, bench in results["benchmarks"].items():
        for loops, metrics in bench["budgets"].items():
            flat = per_budget.setdefault(int(loops), {})
            for key, value in metrics.items():
                if key == "pass@k":
                    flat.update({f"{name}/pass@{k}": v for k, v in value.items()})
                elif key != "num_loops":
                    flat[f"{name}/{key}"] = value
    return dict(sorted(per_budget.items()))


def log_metrics(config, output_dir: Path, results: dict, plot_paths: list[Path]) -> None:
    """metrics.jsonl (always) and wandb (when enabled), stepping over the loop budget."""
    from nemo_loop.utils.logging import MetricsLogger

    logger = MetricsLogger(config.wandb, config, output_dir, _format_budget)
    for loops, metrics in flat_metrics_per_budget(results).items():
        logger.log(loops, metrics)
    if logger.run is not None:
        import wandb

        logger.run.log({f"plots/{path.stem}": wandb.Image(str(path)) for path in plot_paths})
        logger.run.summary["checkpoint"] = results["checkpoint"]
    logger.close()


def _format_budget(loops: int, metrics: dict) -> str:
    accuracy = " ".join(f"{key.split('/')[0]}={value:.3f}" for key, value in metrics.items()
                        if key.endswith("/avg@n"))
    return f"loops {loops} | avg@n {accuracy}"
