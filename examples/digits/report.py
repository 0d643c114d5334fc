"""Results of a sweep: the JSON record, the mean ± std markdown table and the accuracy plot (PNG, Agg backend)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (servers, CI)
import matplotlib.pyplot as plt

TIME_KEYS = ("model_s", "aggregation_s", "optimizer_s", "wall_s")


def _mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(runs: list[dict], tasks: list[str]) -> dict[str, dict]:
    """Per method (in the order first met): mean ± std over seeds of each task's accuracy, of their mean and of
    each time category."""
    methods = list(dict.fromkeys(run["method"] for run in runs))
    summary = {}
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        summary[method] = {
            "seeds": [run["seed"] for run in mine],
            "accuracy": {task: _mean_std([run["accuracy"][task] for run in mine]) for task in tasks},
            "mean_accuracy": _mean_std([run["mean_accuracy"] for run in mine]),
            "time": {key: _mean_std([run["time"][key] for run in mine]) for key in TIME_KEYS},
        }
    return summary


def _percent(stats: dict[str, float], with_std: bool) -> str:
    text = f"{100 * stats['mean']:.1f}"
    return f"{text} ± {100 * stats['std']:.1f}" if with_std else text


def markdown_table(summary: dict[str, dict], tasks: list[str]) -> str:
    """Test accuracy (%) per task and on average, and seconds per run in the model vs in aggregation."""
    with_std = any(len(entry["seeds"]) > 1 for entry in summary.values())
    header = ["method", *(f"{task} acc. %" for task in tasks), "mean acc. %", "model s", "aggregation s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in summary.items():
        cells = [
            method,
            *(_percent(entry["accuracy"][task], with_std) for task in tasks),
            _percent(entry["mean_accuracy"], with_std),
            f"{entry['time']['model_s']['mean']:.1f}",
            f"{entry['time']['aggregation_s']['mean']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict], tasks: list[str], title: str, path: Path) -> None:
    """Grouped bars: each task's test accuracy (and their mean) per method, error bars one std over seeds."""
    series = [*tasks, "mean"]
    methods = list(summary)
    with_std = any(len(entry["seeds"]) > 1 for entry in summary.values())
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.75 * len(methods) + 3), 4.5))
    for j, name in enumerate(series):
        stats = [entry["mean_accuracy"] if name == "mean" else entry["accuracy"][name] for entry in summary.values()]
        axes.bar(
            [i + (j - (len(series) - 1) / 2) * width for i in range(len(methods))],
            [100 * s["mean"] for s in stats],
            width,
            yerr=[100 * s["std"] for s in stats] if with_std else None,
            capsize=2,
            label=name,
        )
    lowest = min(s["mean"] - s["std"] for entry in summary.values() for s in entry["accuracy"].values())
    axes.set_ylim(max(0.0, 100 * lowest - 5), 100)
    axes.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over a bar
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(runs: list[dict], settings: dict, tasks: list[str], out: Path, stem: str, title: str) -> dict[str, Path]:
    """Write ``<stem>.json`` (settings, every run, the summary), ``<stem>.md`` (the table) and ``<stem>.png``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, tasks)
    paths = {suffix: out / f"{stem}.{suffix}" for suffix in ("json", "md", "png")}
    record = {"settings": settings, "summary": summary, "runs": runs}
    paths["json"].write_text(json.dumps(record, indent=2) + "\n")
    paths["md"].write_text(markdown_table(summary, tasks))
    plot(summary, tasks, title, paths["png"])
    return paths
