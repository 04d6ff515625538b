"""Train the same job with several `ttt.method`s (and seeds) side by side and print one table: the loss at
every step, the gradient norm, the largest fast-weight update norm and the held-out answer accuracy.

    python -m tools.studies.compare_ttt --methods none,ntp,inplace --out runs/compare -- \\
        model=hf model.path=models/smollm2 data=synthetic_passkey_text data.tokenizer=models/smollm2 \\
        data.seq_len=1024 train.steps=4

Every run is a plain `ttt-train` job (arguments after `--` go to each one; `none`, which has nothing of its own
to train, always continues the whole model: `train.trainable=all`) in OUT/<method>-seed<seed>, run one after
another so they share the machine alike; the table (markdown) and every number (JSON) are written to
OUT/compare.md and OUT/compare.json. A finished run directory is read again instead of retrained. With
--ppl-data each run's last checkpoint is also scored on held-out documents (`tools.commands.eval --tasks ppl`, NLL by
position in buckets one attention window wide): the table gains the NLL within the window and beyond it, and
OUT/held_out_nll.png plots the methods' curves. With --distance-edges each run's last checkpoint is scored again
on its own held-out answers (the run's eval.seed and eval.samples), split by key -> answer distance at those edges
(which need not be the run's eval.distance_edges): the table gains one accuracy column per distance bucket.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from tools.cli import OneLineErrorParser, positive_int
from trainer.checkpoint import complete_checkpoints
from trainer.checkpoint.trained_model import load_checkpoint_model
from trainer.config import job_config
from trainer.data import build_dataset
from trainer.evaluation.answers import answer_accuracy, distance_span
from trainer.loop import setup_ranks
from trainer.model import CausalLMLoss
from trainer.tracking import write_json_atomically


def _run(out: Path, method: str, seed: int, overrides: list[str]) -> Path:
    run_dir = out / f"{method}-seed{seed}"
    if (run_dir / "metrics.jsonl").is_file() and (run_dir / "done").is_file():
        return run_dir
    command = [sys.executable, "-m", "trainer.train", *overrides, f"ttt={method}", f"seed={seed}"]
    if method == "none":  # nothing of its own to train: the baseline continues the whole base model
        command.append("train.trainable=all")
    command += [f"hydra.run.dir={run_dir}", "train.progress=false", "checkpoint.every=100000"]
    began = time.time()
    print(f"compare_ttt: {method} seed {seed} ...", file=sys.stderr, flush=True)
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise SystemExit(f"compare_ttt: error: {method} seed {seed} failed: {reason}")
    (run_dir / "done").write_text(f"{time.time() - began:.0f} s\n")
    return run_dir


def _held_out_nll(run_dir: Path, ppl: argparse.Namespace) -> dict | None:
    """Held-out NLL by position of the run's last checkpoint (`tools.commands.eval --tasks ppl`, linear buckets one
    window wide), kept in RUN/ppl; None without --ppl-data."""
    if ppl.ppl_data is None:
        return None
    out = run_dir / "ppl"
    if not (out / "ppl.json").is_file():
        checkpoint = complete_checkpoints(run_dir / "checkpoints")[-1]
        command = [sys.executable, "-m", "tools.commands.eval", str(checkpoint), "--tasks", "ppl",
                   "--ppl-data", ppl.ppl_data, "--ppl-length", str(ppl.ppl_length),
                   "--ppl-documents", str(ppl.ppl_documents), "--ppl-spacing", "linear",
                   "--ppl-buckets", str(ppl.ppl_length // ppl.ppl_window),
                   "--out", str(out), "--wandb-mode", "disabled"]  # fmt: skip
        if ppl.ppl_tokenizer:
            command += ["--tokenizer", ppl.ppl_tokenizer]
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise SystemExit(f"compare_ttt: error: perplexity of {run_dir.name} failed: {result.stderr.strip()[-300:]}")
    buckets = [b for b in json.loads((out / "ppl.json").read_text())["buckets"] if b["tokens"]]

    def mean(part: list[dict]) -> float:
        return sum(b["nll"] * b["tokens"] for b in part) / sum(b["tokens"] for b in part)

    within = [b for b in buckets if b["end"] <= ppl.ppl_window]
    beyond = [b for b in buckets if b["start"] >= ppl.ppl_window]
    return {"within": mean(within), "beyond": mean(beyond), "buckets": buckets}


def _answers_by_distance(run_dir: Path, edges: list[int]) -> list[dict] | None:
    """The held-out answer accuracy of the run's last checkpoint per key -> answer distance bucket split at
    `edges`, scored as the training loop scores it (its held-out documents and count), kept in
    RUN/answers_by_distance.json; None without edges."""
    if not edges:
        return None
    kept = run_dir / "answers_by_distance.json"
    if kept.is_file() and (scored := json.loads(kept.read_text()))["edges"] == edges:
        return scored["by_distance"]
    # loading the checkpoint also sets up the resolvers the saved config uses
    model = load_checkpoint_model(complete_checkpoints(run_dir / "checkpoints")[-1])
    job = job_config(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
    held_out = build_dataset(job.data.name, job.data.seq_len, model.config.vocab_size, job.eval.seed, job.data.options)
    if not job.eval.samples or not hasattr(held_out, "sample"):
        raise SystemExit(
            f"compare_ttt: error: --distance-edges: {run_dir.name} has no held-out answers to score "
            f"(data {job.data.name}, eval.samples {job.eval.samples})"
        )
    scores = answer_accuracy(CausalLMLoss(model), held_out, job.eval.samples, setup_ranks(cp=1), tuple(edges))
    write_json_atomically(kept, {"edges": edges, **scores})
    return scores["by_distance"]


def _summary(run_dir: Path, args: argparse.Namespace) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    update = [max((v for k, v in r.items() if k.startswith("ttt_update_norm/")), default=0.0) for r in records]
    evaluation = run_dir / "eval.json"
    return {
        "loss": [r["loss"] for r in records],
        "grad_norm": [r["grad_norm"] for r in records],
        "max_update_norm": update,
        "accuracy": _accuracies(evaluation)[0],
        "accuracy_far": _accuracies(evaluation)[1],
        "seconds": float((run_dir / "done").read_text().split()[0]),
        "held_out_nll": _held_out_nll(run_dir, args),
        "by_distance": _answers_by_distance(run_dir, args.distance_edges),
    }


def _accuracies(evaluation: Path) -> tuple[float | None, float | None]:
    """The held-out accuracy, and that of the answers beyond the last `eval.distance_edges` edge (None without)."""
    if not evaluation.is_file():
        return None, None
    scores = json.loads(evaluation.read_text())
    far = scores["by_distance"][-1]["accuracy"] if len(scores["by_distance"]) > 1 else None
    return scores["accuracy"], far


def _edges(text: str) -> list[int]:
    try:
        edges = [int(e) for e in text.split(",") if e]
    except ValueError:
        edges = []
    if not edges or any(e <= 0 for e in edges) or edges != sorted(set(edges)):
        raise argparse.ArgumentTypeError(f"must be increasing positive integers, comma-separated, got {text!r}")
    return edges


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict[str, list[dict]], steps_shown: list[int]) -> str:
    """Markdown: per method, the seed-mean loss at the chosen steps (the largest ratio to `none`'s over all
    steps, when run), grad norm at the first and last step (seed 0), the largest update norm, and the held-out
    accuracy overall and beyond the last distance edge (mean ± std over seeds)."""
    base = results.get("none")
    head = [f"loss {s}" for s in steps_shown]
    lines = [
        "| ttt | " + " | ".join(head) + " | max loss / none | grad norm first, last | max update norm | accuracy"
        " | accuracy beyond the last distance edge |",
        "|---|" + "---:|" * (len(head) + 5),
    ]
    for method, runs in results.items():
        mean_loss = [statistics.mean(run["loss"][i] for run in runs) for i in range(len(runs[0]["loss"]))]
        ratio = "-"
        if base is not None:
            base_loss = [statistics.mean(run["loss"][i] for run in base) for i in range(len(mean_loss))]
            ratio = f"{max(a / b for a, b in zip(mean_loss, base_loss)):.3f}"
        grads = f"{runs[0]['grad_norm'][0]:.2f}, {runs[0]['grad_norm'][-1]:.2f}"
        update = max(max(run["max_update_norm"]) for run in runs)
        accuracy = " | ".join(_mean_std(values) if values else "-" for values in (
            [run["accuracy"] for run in runs if run["accuracy"] is not None],
            [run["accuracy_far"] for run in runs if run["accuracy_far"] is not None],
        ))  # fmt: skip
        cells = [f"{mean_loss[s - 1]:.4f}" for s in steps_shown]
        nll = [run["held_out_nll"] for run in runs if run.get("held_out_nll")]
        held_out = (
            (" | " + " | ".join(_mean_std([n[part] for n in nll]) for part in ("within", "beyond"))) if nll else ""
        )
        by_distance = ""
        scored_runs = [run["by_distance"] for run in runs if run.get("by_distance")]
        for per_run in zip(*scored_runs):  # one bucket of every scored run
            scores = [bucket["accuracy"] for bucket in per_run if bucket["accuracy"] is not None]
            by_distance += f" {_mean_std(scores) if scores else '-'} |"
        lines.append(
            f"| {method} | "
            + " | ".join(cells)
            + f" | {ratio} | {grads} | {update:.3g} | {accuracy}{held_out} |{by_distance}"
        )
    if any(run.get("held_out_nll") for runs in results.values() for run in runs):
        lines[0] += " held-out NLL within the window | beyond it |"
        lines[1] += "---:|---:|"
    scored = next((run["by_distance"] for runs in results.values() for run in runs if run.get("by_distance")), None)
    for bucket in scored or []:
        lines[0] += f" accuracy at distance {distance_span(bucket)} ({bucket['answers']}) |"
        lines[1] += "---:|"
    return "\n".join(lines)


def plot_held_out_nll(results: dict[str, list[dict]], path: Path) -> None:
    """Held-out NLL by position bucket, one line per method (the mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for method, runs in results.items():
        curves = [run["held_out_nll"]["buckets"] for run in runs if run.get("held_out_nll")]
        if curves:
            ends = [b["end"] for b in curves[0]]
            axes.plot(ends, [statistics.mean(c[i]["nll"] for c in curves) for i in range(len(ends))], marker="o",
                      label=method)  # fmt: skip
    axes.set(xlabel="position (bucket end, tokens)", ylabel="held-out NLL (nats)", title="Held-out NLL by position")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m tools.studies.compare_ttt", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="none,ntp,inplace", help="comma-separated ttt methods")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs and the report")
    parser.add_argument("--show-steps", default="", help="comma-separated steps to tabulate (default: all, up to 8)")
    parser.add_argument("--ppl-data", help="JSONL of held-out documents: score each run's NLL by position on them")
    parser.add_argument("--ppl-tokenizer", help="the tokenizer folder for --ppl-data")
    parser.add_argument("--ppl-length", type=positive_int, default=512, help="tokens per held-out document")
    parser.add_argument("--ppl-documents", type=positive_int, default=64, help="held-out documents")
    parser.add_argument("--ppl-window", type=positive_int, default=64, help="attention's window: within vs beyond")
    parser.add_argument(
        "--distance-edges",
        type=_edges,
        default=[],
        help="comma-separated key -> answer distances: re-score each run's answers in these buckets",
    )
    parser.add_argument("overrides", nargs="*", help="ttt-train overrides (after --)")
    args = parser.parse_args(argv)
    if args.ppl_length % args.ppl_window:
        parser.error(f"--ppl-length must be a multiple of --ppl-window, got {args.ppl_length} and {args.ppl_window}")
    methods = [m for m in args.methods.split(",") if m]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {m: [_summary(_run(args.out, m, seed, args.overrides), args) for seed in seeds] for m in methods}
    steps = len(next(iter(results.values()))[0]["loss"])
    shown = [int(s) for s in args.show_steps.split(",") if s] or list(range(1, steps + 1))[-8:]
    report = table(results, shown)
    (args.out / "compare.md").write_text(report + "\n")
    if args.ppl_data:
        plot_held_out_nll(results, args.out / "held_out_nll.png")
    write_json_atomically(args.out / "compare.json", {"overrides": args.overrides, "seeds": seeds, "runs": results})
    print(report)


if __name__ == "__main__":
    main()
