"""Report of the recall ablation: recall accuracy per TTT method over seeds, and by key -> query distance.

    ttt-train -m experiment=recall_ablation           # trains + evaluates every (method, seed), then reports
    python -m tools.studies.recall_ablation multirun/<name>   # (re)build the report of a finished sweep

Each run of the sweep leaves `eval.json` (the final held-out evaluation, `trainer/evaluation/answers.py`) and its
composed config. The report (`ablation.md`, `ablation.json`, `ablation.png` in the sweep directory)
gives per method the mean, sample standard deviation and range of the accuracy over seeds, and the
mean accuracy per distance bucket; it is logged to W&B as a run of the sweep's group.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from tools.cli import OneLineErrorParser
from trainer.config import WandbConfig
from trainer.tracking import WandbRun, write_json_atomically, write_text_atomically

METHODS = ("none", "recon", "inplace", "ntp")  # the table's order


def collect(sweep_dir: Path) -> list[dict]:
    """One record per finished run of the sweep: method, seed, final evaluation and loss."""
    runs = []
    for config_file in sorted(sweep_dir.glob("*/.hydra/config.yaml")):
        run_dir = config_file.parents[1]
        if not (run_dir / "eval.json").exists():
            continue
        config = OmegaConf.load(config_file)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        runs.append({
            "method": config.ttt.method, "seed": config.seed, "cp": config.parallel.cp, "run": run_dir.name,
            "final_loss": rows[-1]["loss"], **json.loads((run_dir / "eval.json").read_text()),
        })  # fmt: skip
    if not runs:
        raise ValueError(f"{sweep_dir} holds no finished run (no */eval.json)")
    return runs


def summarize(runs: list[dict]) -> dict:
    """Per method: accuracy mean / sample std / min / max over seeds, and mean accuracy per distance bucket."""
    methods = sorted({r["method"] for r in runs}, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    summary = {}
    for method in methods:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        accuracies = [r["accuracy"] for r in mine]
        buckets = []
        for i, bucket in enumerate(mine[0]["by_distance"]):
            scores = [r["by_distance"][i]["accuracy"] for r in mine if r["by_distance"][i]["accuracy"] is not None]
            buckets.append({"min": bucket["min"], "max": bucket["max"], "accuracy": _mean(scores)})
        summary[method] = {
            "seeds": [r["seed"] for r in mine], "accuracy": accuracies, "mean": _mean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "min": min(accuracies), "max": max(accuracies), "final_loss": _mean([r["final_loss"] for r in mine]),
            "by_distance": buckets,
        }  # fmt: skip
    return summary


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def markdown(summary: dict, answers: int) -> str:
    lines = [
        "| ttt.method | recall accuracy, mean ± std over seeds (min-max) | seeds | final train loss |",
        "|---|---|---:|---:|",
    ]
    for method, s in summary.items():
        lines.append(
            f"| {method} | {s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.3f}-{s['max']:.3f}) | {len(s['seeds'])} "
            f"| {s['final_loss']:.3f} |"
        )
    return "\n".join(lines) + f"\n\n{answers} held-out answers per run.\n"


def plot(summary: dict, path: Path) -> None:
    """Accuracy per key -> query distance bucket, one line per method (styled apart: lines may overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    styles = zip("osD^v", ("-", "--", "-.", ":", "-"))
    for (method, s), (marker, line) in zip(summary.items(), styles):
        points = [(i, b["accuracy"]) for i, b in enumerate(s["by_distance"]) if b["accuracy"] is not None]
        axes.plot([i for i, _ in points], [a for _, a in points], marker=marker, linestyle=line, label=method)
    buckets = next(iter(summary.values()))["by_distance"]
    axes.set_xticks(range(len(buckets)), [_bucket_label(b) for b in buckets])
    axes.set_xlabel("key -> query distance (tokens)")
    axes.set_ylabel("recall accuracy (mean over seeds)")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(title="ttt.method", loc="center right")
    figure.tight_layout()
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    temporary.replace(path)


def _bucket_label(bucket: dict) -> str:
    if bucket["max"] is None:
        return f">= {bucket['min']}"
    return f"< {bucket['max']}" if bucket["min"] == 0 else f"{bucket['min']}-{bucket['max']}"


def write_report(sweep_dir: Path, wandb_cfg: WandbConfig | None) -> str:
    """Write ablation.{json,md,png} into the sweep directory (and to W&B); returns the table."""
    runs = collect(sweep_dir)
    summary = summarize(runs)
    table = markdown(summary, runs[0]["answers"])
    write_json_atomically(sweep_dir / "ablation.json", {"runs": runs, "summary": summary})
    write_text_atomically(sweep_dir / "ablation.md", table)
    plot(summary, sweep_dir / "ablation.png")
    if wandb_cfg is not None and wandb_cfg.mode != "disabled":
        _log_to_wandb(summary, sweep_dir, wandb_cfg)
    return table


def _log_to_wandb(summary: dict, sweep_dir: Path, wandb_cfg: WandbConfig) -> None:
    import wandb

    run = WandbRun(wandb_cfg, sweep_dir, {"report": "recall_ablation"}, None, f"{sweep_dir.name}-report")
    rows = [[m, s["mean"], s["std"], s["min"], s["max"], len(s["seeds"])] for m, s in summary.items()]
    record = {
        "ablation/accuracy": wandb.Table(columns=["method", "mean", "std", "min", "max", "seeds"], data=rows),
        "ablation/by_distance": wandb.Image(str(sweep_dir / "ablation.png")),
        **{f"ablation/{m}/mean_accuracy": s["mean"] for m, s in summary.items()},
    }
    run.log(record, step=0)
    run.finish()


class ReportCallback(Callback):
    """Hydra callback of `experiment=recall_ablation`: report once every run of the sweep is done."""

    def on_multirun_end(self, config, **kwargs) -> None:
        logging = config.logging.wandb
        wandb_cfg = WandbConfig(
            mode=logging.mode, project=logging.project, entity=logging.entity,
            group=logging.group or Path(config.hydra.sweep.dir).name, tags=tuple(logging.tags or ()),
        )  # fmt: skip
        sweep_dir = Path(config.hydra.sweep.dir)
        print(write_report(sweep_dir, wandb_cfg) + f"report: {sweep_dir}/ablation.{{md,json,png}}")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m tools.studies.recall_ablation", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory of experiment=recall_ablation")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.sweep_dir, None))
    except (ValueError, OSError) as err:
        parser.error(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
