"""`ttt-plan`: plan a training job before it runs, from the trainer's own Hydra config.

    ttt-plan memory model=qwen3-8b data.seq_len=131072 parallel.cp=8 train.activation_checkpointing=true \\
        --gpus 64 --gpu-memory-gb 80
    ttt-plan time model=qwen3-8b data.seq_len=131072 parallel.cp=8 --gpus 64 --gpu h200
    ttt-plan time model=qwen3-8b data.seq_len=131072 --gpus 64 --fastest      # the fastest CP x DP split
    ttt-plan time ... --rates gpu_check.json                                   # rates a GPU measured

Both describe a run the same way: Hydra overrides composed exactly as `ttt-train` composes them, `--gpus`,
`--gpu` (a kind of `trainer.planning.hardware.GPUS`), `--gpu-memory-gb`, `--gpus-per-node`, `--device`;
`train.activation_checkpointing=auto` is resolved as the trainer resolves it. `memory` prints the per-GPU bytes
row by row at the step's peak (`trainer.planning.memory`, whose docstring is the method), the smallest CP degree
that fits, and ends with `base_params=<int> ttt_params=<int> per_gpu_bytes=<int>`. `time` prints where one
optimizer step's time goes and the bytes each collective moves (`trainer.planning.step_time`), and ends with
`step_s=<float> tokens_per_s_per_gpu=<float> mfu=<float> bottleneck=<name>`; `--fastest` tries every CP degree
that divides the GPUs and keeps those whose memory plan fits 90% of the GPU; `--markdown-row` prints
docs/planner.md's rows. A bad config is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from tools.cli import OneLineErrorParser, positive_int
from trainer.compose import job_of
from trainer.config import JobConfig
from trainer.planning.hardware import GPUS, Links
from trainer.planning.memory import (
    AUTO_BUDGET,
    DEVICES,
    FP32,
    GIB,
    LOSS_CHUNK,
    ROWS,
    SHARDED,
    Activations,
    ModelFacts,
    Plan,
    Setup,
    cheapest_checkpointing,
    checkpointed_layers,
    meta_model,
    model_facts,
    plan,
    setup_of,
    smallest_fitting_cp,
)
from trainer.planning.step_time import (
    DEFAULT_GPU,
    PlanTimeError,
    Prediction,
    Rates,
    Split,
    builtin_rates,
    candidate_splits,
    fastest_split,
    predict,
    rates_from_gpu_check,
)

# --- the memory report -------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _row_notes(m: ModelFacts, result: Plan) -> dict[str, str]:
    st, act = result.setup, result.activations
    shard_params, shard_grads, shard_optim = SHARDED[st.engine]
    spread = f"sharded over {st.gpus} GPUs" if st.gpus > 1 else "one GPU"
    optimizer = "fp32 AdamW m, v" + (" + fp32 master" if st.master_bytes < FP32 else "")
    weights = "fp32 master, bf16 compute copies" if st.master_bytes != st.param_bytes else "model dtype"
    recomputed = len(checkpointed_layers(m, st))
    kept = m.layers - recomputed
    held = f"{kept} layers + {recomputed} layer inputs, 1 recomputed" if recomputed else f"{m.layers} layers"
    kv_layers = kept + (1 if recomputed else 0)
    return {
        "parameters": f"{weights}; {spread}, root + 2 layers gathered" if shard_params else f"{weights}; replicated",
        "gradients": spread if shard_grads else "replicated",
        "optimizer": "in CPU memory (parallel.offload)"
        if st.offload
        else f"{optimizer}, {spread if shard_optim else 'replicated'}",
        "activations": f"{held}; K/V {_gib(act.attention.kv * kv_layers)}"
        + (f", CPU masks {_gib(act.attention.mask * kv_layers)}" if act.attention.mask else "")
        + " GiB of it",
        "fast-weight states": f"{m.ttt_layers} TTT layers, pairs of {m.hidden} x {m.intermediate} fp32",
        "loss": "liger: gradients of hidden states and head (fp32) in its forward, one logits block"
        if st.fused_loss
        else f"{LOSS_CHUNK} tokens x {m.vocab} vocab blocks in fp32, fp32 head and its gradient",
    }


def _activation_lines(m: ModelFacts, act: Activations) -> list[str]:
    att = act.attention
    return [
        f"activations per decoder layer (GiB): attention {_gib(att.saved)} (K/V {_gib(att.kv)}"
        + (f", CPU masks {_gib(att.mask)}" if att.mask else "")
        + f"), MLP {_gib(act.mlp)}, TTT layer extra {_gib(act.ttt_extra)}; "
        f"held at the backward's start {_gib(act.saved)}, recomputed layer {_gib(act.recomputed)}, "
        f"gradients in flight {_gib(act.backward)}"
    ]


def memory_report(name: str, m: ModelFacts, result: Plan, fit: Plan | None, budget_gib: float) -> str:
    st = result.setup
    lines = [
        f"{name}: {m.base_params:,} base + {m.ttt_params:,} TTT parameters ({m.ttt_layers} TTT layers); "
        f"S={st.seq_len}, batch {st.batch}, {st.gpus} GPUs, CP={st.cp} (DP={st.gpus // st.cp}), {st.engine}, "
        f"activation checkpointing {f'every {st.checkpoint_every} layers' if st.checkpointing else 'off'}, "
        f"{st.attention} attention, "
        f"{st.act_bytes}-byte activations",
        "",
        f"| per GPU | GiB at the peak ({result.peak}) | bytes | largest GiB in the step | counted |",
        "|---|---:|---:|---:|---|",
    ]
    notes = _row_notes(m, result)
    lines += [
        f"| {row} | {_gib(value)} | {value} | {_gib(result.largest(row))} | {notes[row]} |"
        for row, value in result.rows.items()
    ]
    lines += [f"| total | {_gib(result.total)} | {result.total} | | |", ""]
    lines += _activation_lines(m, result.activations)
    if fit is None:
        lines.append(f"no power-of-two CP degree dividing {st.gpus} GPUs fits {budget_gib:g} GiB")
    else:
        lines.append(f"smallest CP degree that fits {budget_gib:g} GiB: {fit.setup.cp} ({_gib(fit.total)} GiB)")
    lines.append(f"base_params={m.base_params} ttt_params={m.ttt_params} per_gpu_bytes={result.total}")
    return "\n".join(lines)


def memory_row(name: str, m: ModelFacts, st: Setup, fit: Plan | None) -> str:
    """One row of the README's model table: the plan at the smallest CP degree that fits."""
    head = f"| {name} | {m.base_params / 1e9:.2f}B | {st.seq_len // 1024}k | {st.gpus} |"
    if fit is None:
        return head + " none fits |" + " |" * (len(ROWS) + 2)
    values = " | ".join(_gib(v) for v in fit.rows.values())
    return f"{head} {fit.setup.cp} | {values} | {_gib(fit.total)} | {fit.peak} |"


# --- the step-time report ----------------------------------------------------------------------------------------


def _checkpointing(st: Setup) -> str:
    if not st.checkpointing:
        return "off"
    return "every layer" if st.checkpoint_every == 1 else f"every {st.checkpoint_every} layers"


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _rate_text(rates: Rates, field: str) -> str:
    value = getattr(rates, field)
    if field == "scan_step_s":
        return f"{value * 1e6:.0f} us per layer, chunk and pass"
    return _si(value, "B/s" if field == "memory" else "FLOP/s")


def time_report(name: str, m: ModelFacts, p: Prediction, links: Links) -> str:
    st, rates = p.setup, p.rates
    lines = [
        f"{name}: S={st.seq_len}, batch {st.batch} x {st.grad_accum} micro-batches, {st.gpus} GPUs "
        f"({links.gpus_per_node} per node), CP={st.cp} (DP={st.gpus // st.cp}), {st.engine}, "
        f"activation checkpointing {_checkpointing(st)}, {'compiled' if st.compiled else 'eager'}, "
        f"TTT {st.ttt.method} on {m.ttt_layers} layers; rates: {rates.gpu}",
        "",
        "| part of the step | seconds | share |",
        "|---|---:|---:|",
    ]
    lines += [f"| {part} | {seconds:.4f} | {100 * seconds / p.step_s:.1f}% |" for part, seconds in p.parts.items()]
    lines += [f"| step | {p.step_s:.4f} | |", ""]
    if p.communication:
        lines += ["| collective traffic (per GPU, per step) | bytes sent | seconds alone |", "|---|---:|---:|"]
        lines += [f"| {purpose} | {sent} | {sec:.4f} |" for purpose, (sent, sec) in sorted(p.communication.items())]
        lines.append("")
    lines += [f"rate {field}: {_rate_text(rates, field)} ({source})" for field, source in rates.sources]
    lines.append(
        f"tokens/s per GPU {p.tokens_per_s:,.0f}, MFU {100 * p.mfu:.1f}% (peak {rates.peak / 1e12:.0f} TFLOP/s), "
        f"bottleneck: {p.bottleneck}"
    )
    lines.append(p.line())
    return "\n".join(lines)


def time_row(name: str, m: ModelFacts, st: Setup, split: Split | None, overrides: list[str]) -> str:
    """One row of docs/planner.md's table: the fastest split that fits."""
    head = f"| {name} | {st.seq_len // 1024}k | {st.gpus} |"
    if split is None:
        return head + " none fits | | | | | | |"
    p = split.prediction
    c = p.setup
    command = " ".join([*overrides, f"parallel.cp={c.cp}", f"--gpus {c.gpus}"])
    return (
        f"{head} {c.cp} x {c.gpus // c.cp} | {_checkpointing(c)} | {p.step_s:.2f} | {p.tokens_per_s:,.0f} | "
        f"{100 * p.mfu:.1f}% | {p.bottleneck} ({100 * p.parts[p.bottleneck] / p.step_s:.0f}%) | "
        f"{split.memory_bytes / GIB:.1f} | `{command}` |"
    )


# --- command line -----------------------------------------------------------------------------------------------


def run_parser(prog: str, description: str) -> OneLineErrorParser:
    """The flags that describe a run, one set for both planners: Hydra
    overrides composed as `ttt-train` composes them, the GPUs, their kind and memory, the GPUs per node."""
    parser = OneLineErrorParser(prog=prog, description=description)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for ttt-train (model=qwen3-8b ...)")
    parser.add_argument("--gpus", type=positive_int, default=8, help="GPUs in the job (default 8)")
    parser.add_argument("--gpu", choices=sorted(GPUS), help="GPU kind: its memory, and for plan_time its rates")
    parser.add_argument("--gpu-memory-gb", type=float, help="memory per GPU in GiB (default: the --gpu's, else 80)")
    parser.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--device", choices=DEVICES, default="cuda", help="cuda (default): bf16 autocast, Triton loss")
    return parser


def parse_run(parser: OneLineErrorParser, argv: list[str] | None, default_gpu: str | None = None) -> argparse.Namespace:
    """Parsed run flags; --gpu-memory-gb defaults to the memory of --gpu (or of `default_gpu`), else 80."""
    args = parser.parse_intermixed_args(argv)
    if args.gpu_memory_gb is None:
        gpu = args.gpu or default_gpu
        args.gpu_memory_gb = GPUS[gpu].memory_gib if gpu else 80.0
    if not args.gpu_memory_gb > 0:
        parser.error(f"--gpu-memory-gb must be positive, got {args.gpu_memory_gb:g}")
    return args


def run_of(args: argparse.Namespace) -> tuple[JobConfig, ModelFacts, Setup]:
    """The job, its model and its setup from parsed run flags; a bad config exits with one line (code 2).
    `train.activation_checkpointing=auto` is resolved on CUDA as the trainer resolves it."""
    try:
        job = job_of(args.overrides)
        if args.gpus % job.parallel.cp:
            raise ValueError(f"parallel.cp={job.parallel.cp} does not divide --gpus {args.gpus}")
    except (HydraException, OmegaConfBaseException, ValueError) as err:  # ConfigError is a ValueError
        print(f"error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    facts = model_facts(meta_model(job))
    setup = setup_of(job, args.gpus, args.device)
    if job.train.activation_checkpointing is None and args.device == "cuda":  # auto: as the trainer resolves it
        setup = cheapest_checkpointing(facts, setup, int(AUTO_BUDGET * int(args.gpu_memory_gb * GIB)))
    return job, facts, setup


def _memory(args: argparse.Namespace) -> None:
    job, facts, setup = run_of(args)
    budget = int(args.gpu_memory_gb * GIB)
    fit = smallest_fitting_cp(facts, setup, budget)
    if args.markdown_row:
        print(memory_row(job.model.name, facts, setup, fit))
    else:
        print(memory_report(job.model.name, facts, plan(facts, setup), fit, args.gpu_memory_gb))


def _time(args: argparse.Namespace) -> None:
    job, facts, setup = run_of(args)
    try:
        rates = rates_from_gpu_check(args.rates, args.gpu) if args.rates else builtin_rates(args.gpu or DEFAULT_GPU)
    except PlanTimeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    links = Links(gpus_per_node=args.gpus_per_node)
    budget = int(args.gpu_memory_gb * GIB)
    auto = job.train.activation_checkpointing is None and args.device == "cuda"
    if args.markdown_row:
        for gpus in args.table_gpus or [args.gpus]:
            at = replace(setup, gpus=gpus, engine=setup.engine if gpus > 1 else "single")
            best = fastest_split(facts, at, budget, rates, links, auto)
            command = [*args.overrides, f"--gpu {args.gpu or DEFAULT_GPU}"]
            print(time_row(job.model.name, facts, at, best, command), flush=True)
        return
    if args.fastest:
        splits = candidate_splits(facts, setup, budget, rates, links, auto)
        best = max(splits, key=lambda s: s.prediction.tokens_per_s, default=None)
        lines = ["| CP x DP | checkpointing | GiB | step s | tokens/s/GPU | MFU | bottleneck |"]
        lines.append("|---|---|---:|---:|---:|---:|---|")
        for s in splits:
            p = s.prediction
            lines.append(f"| {p.setup.cp} x {p.setup.gpus // p.setup.cp} | {_checkpointing(p.setup)} | "
                         f"{s.memory_bytes / GIB:.1f} | {p.step_s:.3f} | {p.tokens_per_s:,.0f} | {100 * p.mfu:.1f}% | "
                         f"{p.bottleneck} |")  # fmt: skip
        print("\n".join(lines))
        if best is None:
            print(f"no CP degree dividing {args.gpus} GPUs fits {args.gpu_memory_gb:g} GiB", file=sys.stderr)
            sys.exit(1)
        print()
        print(time_report(job.model.name, facts, best.prediction, links))
        return
    print(time_report(job.model.name, facts, predict(facts, setup, rates, links), links))


def _parsers() -> dict[str, OneLineErrorParser]:
    memory = run_parser("ttt-plan memory", "Per-GPU memory of one training step (trainer.planning.memory).")
    memory.add_argument("--markdown-row", action="store_true", help="print only docs/planner.md's table row")
    time = run_parser("ttt-plan time", "Time of one training step on 1-64 GPUs (trainer.planning.step_time).")
    time.add_argument("--rates", type=Path, help="a ttt-gpu-check JSON report to read the rates from")
    time.add_argument("--fastest", action="store_true", help="the fastest CP x DP split that fits the memory")
    time.add_argument("--markdown-row", action="store_true", help="only docs/planner.md's row of the fastest split")
    time.add_argument("--table-gpus", type=positive_int, nargs="+", metavar="N",
                      help="with --markdown-row: one row per GPU count (instead of --gpus)")  # fmt: skip
    return {"memory": memory, "time": time}


def main(argv: list[str] | None = None) -> None:
    """`ttt-plan memory|time OVERRIDES... [flags]`: the subcommand first, then its overrides and flags in any order
    (argparse's intermixed parsing, which its subparsers do not support, hence the dispatch by hand)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parsers = _parsers()
    usage = "ttt-plan {memory,time} [OVERRIDES ...] [flags]   (flags: ttt-plan memory -h, ttt-plan time -h)"
    top = OneLineErrorParser(
        prog="ttt-plan", usage=usage, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if argv[:1] in (["-h"], ["--help"]):
        top.print_help()
        return
    if not argv or argv[0] not in parsers:
        top.error(f"the first argument must be memory or time, got {argv[0] if argv else 'nothing'}")
    args = parse_run(parsers[argv[0]], argv[1:], default_gpu=DEFAULT_GPU if argv[0] == "time" else None)
    (_memory if argv[0] == "memory" else _time)(args)


if __name__ == "__main__":
    main()
