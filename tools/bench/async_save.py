"""What `checkpoint.async_save` saves of a run's time: the same training with checkpoints written in place and in
the background, side by side.

    python -m tools.bench.async_save [--steps 16] [--every 4] [--hidden 1024] [--layers 8] [-- OVERRIDES...]

Each mode trains the same job (by default a Qwen3-style model of ~110M parameters, large enough that one checkpoint
with its AdamW states is 1.3 GB and takes seconds to write and hash; short sequences, so that the steps
themselves are short) in a fresh `ttt-train` process, one after the other, and reads back its metrics.jsonl:
the median step time without a save, the time a save adds to its step (`time/checkpoint_s` of the steps that
start one, plus of those that finish one in the background), and the run's wall time. Run it on an otherwise idle
machine.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.cli import OneLineErrorParser, positive_int

MODES = {"in place": "false", "async": "true"}


def _train(run_dir: Path, overrides: list[str], async_save: str) -> tuple[list[dict], float]:
    command = [sys.executable, "-m", "trainer.train", *overrides, f"checkpoint.async_save={async_save}",
               f"hydra.run.dir={run_dir}"]  # fmt: skip
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench.async_save: error: the run failed: {result.stderr.strip().splitlines()[-1]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, time.perf_counter() - began


def row(mode: str, rows: list[dict], wall_s: float, every: int, checkpoint_bytes: int) -> str:
    """The table's row of one run: the steps that start no save (the first left out: warm-up), the checkpoint time
    of every step over the number of saves, the sum of the step times, the wall time."""
    plain = [r["step_s"] for r in rows[1:] if r["step"] % every]
    added = sum(r["time/checkpoint_s"] for r in rows) / len([r for r in rows if r["step"] % every == 0])
    return (f"| {mode} | {statistics.median(plain):.3f} | {added:.2f} | "
            f"{sum(r['step_s'] for r in rows):.1f} | {wall_s:.1f} | {checkpoint_bytes / 2**30:.2f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m tools.bench.async_save", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=16, help="optimizer steps per run")
    parser.add_argument("--every", type=positive_int, default=4, help="steps between checkpoints")
    parser.add_argument("--hidden", type=positive_int, default=1024, help="model width")
    parser.add_argument("--layers", type=positive_int, default=8, help="decoder layers")
    parser.add_argument("overrides", nargs="*", help="more ttt-train overrides (after --)")
    args = parser.parse_args(argv)
    overrides = [
        "parallel=single", "model=tiny", "ttt=ntp", f"model.config.hidden_size={args.hidden}",
        f"model.config.intermediate_size={args.hidden * 11 // 4}", f"model.config.num_hidden_layers={args.layers}",
        "model.config.num_attention_heads=16", "model.config.num_key_value_heads=4", "model.config.head_dim=64",
        "model.config.vocab_size=8192", "data.seq_len=64", "ttt.chunk_size=32", f"train.steps={args.steps}",
        f"checkpoint.every={args.every}", "checkpoint.keep=1", "eval.every=0", "train.progress=false",
        "logging.wandb.mode=disabled", *args.overrides,
    ]  # fmt: skip
    lines = [
        f"steps {args.steps}, a checkpoint every {args.every}; model width {args.hidden}, {args.layers} layers",
        "",
        "| checkpoints written | median step s (no save) | s a save adds to the steps | sum of step s | run wall s |"
        " checkpoint GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-async-save-") as scratch:
        for mode, flag in MODES.items():
            run_dir = Path(scratch) / flag
            rows, wall_s = _train(run_dir, overrides, flag)
            kept = next((run_dir / "checkpoints").glob("step-*"))
            size = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file())
            lines.append(row(mode, rows, wall_s, args.every, size))
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
