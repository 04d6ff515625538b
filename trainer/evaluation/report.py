"""Evaluation results as a markdown table and PNG plots (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def markdown_table(scores: dict[str, dict[int, float]], lengths: list[int]) -> str:
    """One row per task, one column per length, scores in percent as RULER reports them, and the mean row."""
    lines = ["| task | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---:|" * len(lengths)]
    for task, row in scores.items():
        lines.append(f"| {task} | " + " | ".join(f"{100 * row[length]:.1f}" for length in lengths) + " |")
    means = [sum(row[length] for row in scores.values()) / len(scores) for length in lengths]
    lines.append("| **mean** | " + " | ".join(f"{100 * mean:.1f}" for mean in means) + " |")
    return "\n".join(lines) + "\n"


def plot_nll_by_position(result: dict, path: Path, log_positions: bool) -> None:
    buckets = [b for b in result["buckets"] if b["tokens"]]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([b["end"] for b in buckets], [b["nll"] for b in buckets], marker="o")
    if log_positions:
        axes.set_xscale("log", base=2)
    axes.set(xlabel="position (bucket end, tokens)", ylabel="mean NLL (nats)", title="NLL by position")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_heatmap(scores: list[list[float]], depths: list[float], lengths: list[int], path: Path) -> None:
    """scores[i][j]: depth i, length j, in [0, 1]."""
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.4 * len(depths)))
    image = axes.imshow(scores, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    axes.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    axes.set_yticks(range(len(depths)), [f"{depth:.2f}" for depth in depths])
    for i, row in enumerate(scores):
        for j, score in enumerate(row):
            axes.text(j, i, f"{100 * score:.0f}", ha="center", va="center", fontsize=7)
    axes.set(xlabel="context length (tokens)", ylabel="needle depth", title="Needle in a haystack (%)")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
