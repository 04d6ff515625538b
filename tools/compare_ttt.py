"""Train the same job with several `ttt.method`s (and seeds) side by side and print one table: the loss at
every step, the gradient norm, the largest fast-weight update norm and the held-out answer accuracy.

    python -m tools.compare_ttt --methods none,ntp,inplace --out runs/compare -- \\
        model=hf model.path=models/smollm2 data=synthetic_passkey_text data.tokenizer=models/smollm2 \\
        data.seq_len=1024 train.steps=4

Every run is a plain `ttt-train` job (arguments after `--` go to each one; `none`, which has nothing of its own
to train, always continues the whole model: `train.trainable=all`) in OUT/<method>-seed<seed>, run one after
another so they share the machine alike; the table (markdown) and every number (JSON) are written to
OUT/compare.md and OUT/compare.json. A finished run directory is read again instead of retrained.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tools.benchutil import OneLineErrorParser
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


def _summary(run_dir: Path) -> dict:
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
    }


def _accuracies(evaluation: Path) -> tuple[float | None, float | None]:
    """The held-out accuracy, and that of the answers beyond the last `eval.distance_edges` edge (None without)."""
    if not evaluation.is_file():
        return None, None
    scores = json.loads(evaluation.read_text())
    far = scores["by_distance"][-1]["accuracy"] if len(scores["by_distance"]) > 1 else None
    return scores["accuracy"], far


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
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {ratio} | {grads} | {update:.3g} | {accuracy} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="compare_ttt", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="none,ntp,inplace", help="comma-separated ttt methods")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs and the report")
    parser.add_argument("--show-steps", default="", help="comma-separated steps to tabulate (default: all, up to 8)")
    parser.add_argument("overrides", nargs="*", help="ttt-train overrides (after --)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {m: [_summary(_run(args.out, m, seed, args.overrides)) for seed in seeds] for m in methods}
    steps = len(next(iter(results.values()))[0]["loss"])
    shown = [int(s) for s in args.show_steps.split(",") if s] or list(range(1, steps + 1))[-8:]
    report = table(results, shown)
    (args.out / "compare.md").write_text(report + "\n")
    write_json_atomically(args.out / "compare.json", {"overrides": args.overrides, "seeds": seeds, "runs": results})
    print(report)


if __name__ == "__main__":
    main()
