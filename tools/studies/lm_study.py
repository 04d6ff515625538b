"""Do the fast weights earn their cost on real text? Small models trained from scratch side by side, with controls.

    python -m tools.studies.lm_study run --out runs/lm_study        # the whole grid: data, runs, scores, report
    python -m tools.studies.lm_study run --out runs/lm_study --arms full --seeds 0   # one more arm, in the report
    python -m tools.studies.lm_study speed --out runs/lm_study      # each arm's tokens/s alone, into the report
    python -m tools.studies.lm_study score runs/lm_study/runs/ntp-seed0 --data docs.jsonl \\
        --tokenizer runs/lm_study/data/bpe4096

`run` builds, under OUT, everything the study reads and keeps what an earlier call finished (each step resumes on
its own): data/ (`ttt-stdlib-corpus`'s split of the standard library, a byte-level BPE trained on its train split with
`ttt-train-tokenizer`, the train split tokenized as `ttt-prepare-data` does), then one
`ttt-train experiment=stdlib_lm` run per arm and seed in runs/<arm>-seed<seed> (`--jobs` at a time, the cores
shared among them; an interrupted run resumes from its last checkpoint), each scored on the held-out split when it
finishes (runs/<arm>-seed<seed>/heldout_nll.json). Arms (`ARMS`): `none` (every layer's attention limited to a
window of W tokens), `global` (the same, but the last layer attends to the whole sequence: the upper reference),
`full` (every layer global; not run by default), `ntp` and `inplace` (fast weights), `nomem` (the control: the
fast weights' parameters applied to the current token only, no memory). Every arm of a seed reads the same tokens
in the same order for the same optimizer steps.

The report (OUT/report.md, OUT/report.json, OUT/heldout_nll.png) covers every finished run under OUT/runs: per arm
the held-out NLL within the window [0, W), between the window and the attention's reach [W, R) (R = layers x W:
what stacked windows can see) and beyond the reach [R, S), mean +- sd over seeds, the per-seed differences to
`none` and to `nomem` beyond the reach, training tokens/s, and the share of the reference arm's gain beyond the
reach that the arm recovers, (NLL_none - NLL_arm) / (NLL_none - NLL_reference); and a second table of each arm's
NLL minus none's by position ([0, W), [W, R), then spans doubling from R).

`score` measures one run's last checkpoint (or a given checkpoints/step-N) on any documents (a JSONL with "text",
or anything `ttt-prepare-data` reads) in the same position buckets, prints the three regions and, with --out,
writes the JSON the report reads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tools.cli import OneLineErrorParser, names_from, positive_int
from tools.commands.stdlib_corpus import build as build_stdlib_corpus
from tools.commands.train_tokenizer import train_tokenizer
from trainer.checkpoint import complete_checkpoints
from trainer.data.errors import DataError
from trainer.data.prepare import prepare
from trainer.tracking import write_json_atomically

EXPERIMENT = "stdlib_lm"
ARMS = {  # arm -> ttt-train overrides; the TTT arms use the experiment's layers, source and chunk size
    "none": ["ttt=none"],
    "global": ["ttt=none"],  # + the last layer's attention global (`arm_overrides`)
    "full": ["ttt=none", "model.config.use_sliding_window=false"],
    "nomem": ["ttt=nomem"],
    "ntp": ["ttt=ntp"],
    "inplace": ["ttt=inplace"],
}
# `full` (every layer global) learns too slowly at this budget to be a reference (docs/lm_study.md): not run by default
DEFAULT_ARMS = ("none", "global", "nomem", "ntp", "inplace")
REGIONS = ("within", "reach", "beyond")
LAST_STEPS = 50  # the train loss column: the mean of the last steps (one step's batch is a few documents)
SPEED = "speed.json"
_REGION_TITLES = {"within": "within the window", "reach": "window to reach", "beyond": "beyond the reach"}
VOCAB_SIZE = 4096


# ---- data --------------------------------------------------------------------------------------------------------


def prepare_study_data(data: Path) -> dict[str, Path]:
    """The held-out documents, the tokenizer and the tokenized train split under `data`, each kept when done."""
    if not (data / "manifest.json").is_file():
        _say(f"documents: the standard library into {data}")
        build_stdlib_corpus(data)
    tokenizer = data / "bpe4096"
    record = train_tokenizer([str(data / "train.jsonl")], VOCAB_SIZE, tokenizer)
    _say(f"tokenizer: {tokenizer} ({'kept' if record.get('kept') else 'trained'})")
    tokens = data / "train_tokens"
    result = prepare([data / "train.jsonl"], tokenizer, tokens, workers=min(2, os.cpu_count() or 1), progress=False)
    _say(f"train tokens: {result.tokens:,} in {tokens} ({result.shards_kept} shard(s) kept)")
    return {"heldout": data / "heldout.jsonl", "tokenizer": tokenizer, "train_tokens": tokens}


# ---- scoring -----------------------------------------------------------------------------------------------------


def study_geometry(run_dir: Path) -> dict[str, int]:
    """The window W, the reach R = layers x W and the sequence length S of a run, from its saved config (a full
    attention run keeps the `sliding_window` it does not use, so it is scored in the windowed runs' buckets)."""
    raw = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False)
    window = raw["model"]["config"].get("sliding_window")
    if not isinstance(window, int):
        raise ValueError(f"{run_dir}: model.config.sliding_window is not set, so there is no window to score by")
    layers = raw["model"]["config"]["num_hidden_layers"]
    return {"window": window, "reach": layers * window, "length": raw["data"]["seq_len"]}


def region_means(buckets: list[dict], geometry: dict[str, int]) -> dict[str, float]:
    """Token-weighted mean NLL of the buckets in [0, W), [W, R) and [R, S)."""
    spans = {"within": (0, geometry["window"]), "reach": (geometry["window"], geometry["reach"]),
             "beyond": (geometry["reach"], geometry["length"])}  # fmt: skip
    return {region: span_mean(buckets, lo, hi) for region, (lo, hi) in spans.items()}


def span_mean(buckets: list[dict], lo: int, hi: int) -> float | None:
    """Token-weighted mean NLL of the buckets inside positions [lo, hi)."""
    part = [b for b in buckets if lo <= b["start"] and b["end"] <= hi and b["tokens"]]
    return sum(b["nll"] * b["tokens"] for b in part) / sum(b["tokens"] for b in part) if part else None


def score(target: Path, data: str, tokenizer: Path, documents: int | None = None) -> dict:
    """Held-out NLL by position of a run's last checkpoint (or a given checkpoint) on the documents of `data` that
    are at least one sequence long, cut to one sequence, in buckets one window wide, and per region."""
    from tools.commands.eval_inputs import load_model, load_tokenizer, perplexity_documents
    from trainer.evaluation.perplexity import bucket_edges, nll_by_position

    if (target / "meta.json").is_file():
        checkpoint = target
    else:
        found = complete_checkpoints(target / "checkpoints")
        if not found:
            raise ValueError(f"{target} is neither a checkpoint nor a run directory with a complete checkpoint")
        checkpoint = found[-1]
    run_dir = checkpoint.parent.parent
    geometry = study_geometry(run_dir)
    length, window = geometry["length"], geometry["window"]
    model = load_model(checkpoint)
    tok = load_tokenizer(tokenizer, model.config.vocab_size)
    docs = perplexity_documents(data, length, 1 << 30, model.config.vocab_size, tok)
    docs = [ids for ids in docs if ids.shape[1] == length][:documents]
    if not docs:
        raise ValueError(f"{data} has no document of {length} tokens or more")
    result = nll_by_position(model, docs, bucket_edges(length, length // window, "linear"), piece_tokens=length)
    return {"checkpoint": str(checkpoint), "data": str(data), **geometry, **result,
            "regions": region_means(result["buckets"], geometry)}  # fmt: skip


# ---- the grid ----------------------------------------------------------------------------------------------------


def _say(line: str) -> None:
    print(f"lm_study: {line}", file=sys.stderr, flush=True)


def _last_error(stderr: str, code: int) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {code}"


def arm_overrides(arm: str, overrides: list[str]) -> list[str]:
    """The ttt-train overrides of an arm; `global` makes the last decoder layer's attention see the whole sequence
    (`layer_types`: the hybrid of local and global layers that long-context models use)."""
    if arm != "global":
        return list(ARMS[arm])
    from trainer.compose import compose_config

    layers = compose_config([f"experiment={EXPERIMENT}", *overrides]).model.config.num_hidden_layers
    kinds = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    return [*ARMS[arm], f"+model.config.layer_types=[{','.join(kinds)}]"]


def run_arm(out: Path, arm: str, seed: int, data: dict[str, Path], overrides: list[str], threads: int) -> Path:
    """Train (or resume, or keep) one arm at one seed and score it on the held-out split."""
    run_dir = out / "runs" / f"{arm}-seed{seed}"
    done = run_dir / "done.json"
    if done.is_file():
        return run_dir
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "trainer.train", f"experiment={EXPERIMENT}", *arm_overrides(arm, overrides),
        f"seed={seed}", f"data.sources=[{{path:{data['train_tokens'].resolve()}}}]", "logging.wandb.mode=disabled",
        *overrides, f"hydra.run.dir={run_dir}", "checkpoint.resume=auto", "train.progress=false",
    ]  # fmt: skip
    began = time.time()
    _say(f"{arm} seed {seed}: training ({threads} thread(s))")
    result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed} failed: {_last_error(result.stderr, result.returncode)}")
    trained = time.time() - began
    scored = subprocess.run(
        [sys.executable, "-m", "tools.studies.lm_study", "score", str(run_dir), "--data", str(data["heldout"]),
         "--tokenizer", str(data["tokenizer"]), "--out", str(run_dir / "heldout_nll.json")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if scored.returncode != 0:
        raise RuntimeError(f"scoring {arm} seed {seed} failed: {_last_error(scored.stderr, scored.returncode)}")
    write_json_atomically(done, {"train_seconds": round(trained), "seconds": round(time.time() - began)})
    _say(f"{arm} seed {seed}: done in {time.time() - began:.0f} s")
    return run_dir


def run_grid(out: Path, arms: list[str], seeds: list[int], overrides: list[str], jobs: int, reference: str) -> dict:
    """Run what is missing of arms x seeds, then report every finished run under OUT/runs (arms run at other seeds
    or by another call included)."""
    began = time.time()
    data = prepare_study_data(out / "data")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    order = [(arm, seed) for seed in seeds for arm in arms]  # seed by seed: a partial grid already compares arms
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_arm, out, arm, seed, data, overrides, threads) for arm, seed in order]
        for future in futures:
            future.result()  # the first failure ends the grid (the finished runs stay)
    return write_report(out, reference, wall_seconds=round(time.time() - began))


def finished_runs(out: Path) -> dict[str, list[dict]]:
    """{arm: [summary of each finished seed, by seed]} of OUT/runs, arms in `ARMS` order."""
    found: dict[str, list[dict]] = {}
    for done in sorted((out / "runs").glob("*-seed*/done.json")):
        arm, seed = done.parent.name.rsplit("-seed", 1)
        if arm in ARMS:
            found.setdefault(arm, []).append({"seed": int(seed), **summary(done.parent)})
    return {arm: sorted(found[arm], key=lambda run: run["seed"]) for arm in ARMS if arm in found}


def write_report(out: Path, reference: str, wall_seconds: int | None = None) -> dict:
    results = finished_runs(out)
    speed = json.loads((out / SPEED).read_text()) if (out / SPEED).is_file() else None
    report = {"reference": reference, "runs": results, "speed": speed, "wall_seconds": wall_seconds}
    write_json_atomically(out / "report.json", report)
    (out / "report.md").write_text(report_table(results, reference, speed) + "\n\n" + position_table(results) + "\n")
    plot_nll(results, out / "heldout_nll.png")
    return report


def summary(run_dir: Path) -> dict:
    """What the report reads of a finished run: its held-out scores, training speed and trainable parameters."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records[min(10, len(records) - 1) :]]  # past the first steps' warm-up
    scored = json.loads((run_dir / "heldout_nll.json").read_text())
    return {
        "run": run_dir.name, "steps": records[-1]["step"],
        "train_loss": statistics.mean(r["loss"] for r in records[-LAST_STEPS:]),
        "tokens_per_s": statistics.median(rates), "regions": scored["regions"], "buckets": scored["buckets"],
        "window": scored["window"], "reach": scored["reach"], "length": scored["length"],
        "documents": scored["documents"], **json.loads((run_dir / "done.json").read_text()),
    }  # fmt: skip


# ---- the report --------------------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> str:
    return f"{values[0]:.3f}" if len(values) == 1 else f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _differences(runs: list[dict], other: list[dict] | None) -> str:
    """Beyond the reach, this arm's NLL minus the other's, seed by seed (the seeds both have)."""
    if other is None or runs is other:
        return "-"
    theirs = {run["seed"]: run["regions"]["beyond"] for run in other}
    return ", ".join(f"{run['regions']['beyond'] - theirs[run['seed']]:+.3f}" for run in runs if run["seed"] in theirs)


def recovered_share(runs: list[dict], none: list[dict], reference: list[dict]) -> float | None:
    """(NLL_none - NLL_arm) / (NLL_none - NLL_reference) beyond the reach, of the seed means; None without a gap
    to recover (the reference not below none)."""
    mean = {key: statistics.mean(r["regions"]["beyond"] for r in group) for key, group in
            (("arm", runs), ("none", none), ("reference", reference))}  # fmt: skip
    gap = mean["none"] - mean["reference"]
    return (mean["none"] - mean["arm"]) / gap if gap > 0 else None


def report_table(results: dict[str, list[dict]], reference: str, speed: dict | None = None) -> str:
    """Markdown: per arm the held-out NLL by region (mean ± sd over seeds), the per-seed differences beyond the
    reach to `none` and to `nomem`, the share of the reference arm's gain beyond the reach, and speed: measured
    alone (`speed`, OUT/speed.json) when there is such a measurement, else the runs' own median (two runs shared
    the machine, and whatever else ran on it)."""
    first = next(iter(results.values()))[0]
    w, r, s = first["window"], first["reach"], first["length"]
    none, nomem, ref = results.get("none"), results.get("nomem"), results.get(reference)
    head = [
        "arm", "seeds", f"NLL within the window [0, {w})", f"window to reach [{w}, {r})",
        f"beyond the reach [{r}, {s})", "beyond, minus none's (per seed)", "beyond, minus nomem's (per seed)",
        f"share of {reference}'s gain beyond the reach",
        "train tokens/s, one core, alone" if speed else "train tokens/s (runs' median)",
        f"train loss, last {LAST_STEPS} steps",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for arm, runs in results.items():
        share = recovered_share(runs, none, ref) if none and ref else None
        cells = [
            arm, ",".join(str(run["seed"]) for run in runs),
            *(_mean_sd([run["regions"][region] for run in runs]) for region in REGIONS),
            _differences(runs, none), _differences(runs, nomem), "-" if share is None else f"{share:.1%}",
            _speed(arm, runs, speed), _mean_sd([run["train_loss"] for run in runs]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def position_spans(window: int, reach: int, length: int) -> list[tuple[int, int]]:
    """[0, W), [W, R), then spans doubling from the reach to the sequence's end: [R, 2R), [2R, 4R), ..."""
    spans, lo = [(0, window), (window, reach)], reach
    while lo < length:
        spans.append((lo, min(2 * lo, length)))
        lo = spans[-1][1]
    return spans


def position_table(results: dict[str, list[dict]]) -> str:
    """Markdown: each arm's held-out NLL minus none's by position, seed by seed then averaged over the seeds: where
    along a document an arm gains (a gain that grows with position is memory; a flat one is capacity)."""
    none = {run["seed"]: run for run in results.get("none", [])}
    first = next(iter(results.values()))[0]
    spans = position_spans(first["window"], first["reach"], first["length"])
    lines = ["| NLL minus none's, by position | " + " | ".join(f"[{lo}, {hi})" for lo, hi in spans) + " |",
             "|---|" + "---:|" * len(spans)]  # fmt: skip
    for arm, runs in results.items():
        paired = [run for run in runs if run["seed"] in none]
        if arm == "none" or not paired:
            continue
        cells = []
        for lo, hi in spans:
            gaps = [
                span_mean(run["buckets"], lo, hi) - span_mean(none[run["seed"]]["buckets"], lo, hi) for run in paired
            ]
            cells.append(f"{statistics.mean(gaps):+.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _speed(arm: str, runs: list[dict], speed: dict | None) -> str:
    if speed is None:
        return f"{statistics.mean(run['tokens_per_s'] for run in runs):,.0f}"
    return f"{speed[arm]['tokens_per_s']:,.0f}" if arm in speed else "-"


def measure_speed(out: Path, arms: list[str], overrides: list[str], steps: int) -> dict:
    """Training tokens/s of each arm alone, one thread (as each grid run had one core): the median of `steps` steps
    after 3 warm-up steps, the arms one after another; kept in OUT/speed.json."""
    from tools.measure import train_step_seconds
    from trainer.compose import job_of

    torch.set_num_threads(1)
    data = prepare_study_data(out / "data")
    measured = json.loads((out / SPEED).read_text()) if (out / SPEED).is_file() else {}
    for arm in arms:
        job = job_of([f"experiment={EXPERIMENT}", *arm_overrides(arm, overrides),
                      f"data.sources=[{{path:{data['train_tokens'].resolve()}}}]", *overrides])  # fmt: skip
        _, seconds = train_step_seconds(job, steps, warmup=3)
        tokens = job.data.seq_len * job.data.batch_size / statistics.median(seconds)
        measured[arm] = {"tokens_per_s": tokens, "steps": steps}
        _say(f"{arm}: {tokens:,.0f} tokens/s")
    write_json_atomically(out / SPEED, measured)
    return measured


def plot_nll(results: dict[str, list[dict]], path: Path) -> None:
    """Held-out NLL by position bucket per arm: the seed mean, and the band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for arm, runs in results.items():
        ends = [b["end"] for b in runs[0]["buckets"]]
        per_seed = [[b["nll"] for b in run["buckets"]] for run in runs]
        columns = list(zip(*per_seed))
        axes.plot(ends, [statistics.mean(c) for c in columns], label=arm, linewidth=1.4)
        if len(runs) > 1:
            axes.fill_between(ends, [min(c) for c in columns], [max(c) for c in columns], alpha=0.15)
    first = next(iter(results.values()))[0]
    for x, label in ((first["window"], "window"), (first["reach"], "reach")):
        axes.axvline(x, color="grey", linestyle=":", linewidth=1)
        axes.text(x, axes.get_ylim()[1], f" {label}", va="top", fontsize=8, color="grey")
    axes.set(xlabel="position (bucket end, tokens)", ylabel="held-out NLL (nats/token)",
             title="Held-out NLL by position, trained from scratch")  # fmt: skip
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- command line ------------------------------------------------------------------------------------------------


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m tools.studies.lm_study", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    grid = commands.add_parser("run", help="the grid: data, runs, scores, report")
    grid.add_argument("--out", type=Path, required=True, help="folder of the data, the runs and the report")
    grid.add_argument(
        "--arms",
        type=names_from(tuple(ARMS)),
        default=list(DEFAULT_ARMS),
        help=f"comma-separated, from {','.join(ARMS)}",
    )
    grid.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds")
    grid.add_argument("--jobs", type=positive_int, default=2, help="runs at a time (the cores are split among them)")
    grid.add_argument("--reference", choices=list(ARMS), default="global", help="the arm whose gain the share is of")
    grid.add_argument("overrides", nargs="*", help="ttt-train overrides for every run (after --)")
    timing = commands.add_parser("speed", help="training tokens/s of each arm alone, then the report again")
    timing.add_argument("--out", type=Path, required=True, help="the grid's folder")
    timing.add_argument("--arms", type=names_from(tuple(ARMS)), default=list(DEFAULT_ARMS), help="comma-separated")
    timing.add_argument("--steps", type=positive_int, default=20, help="timed steps per arm")
    timing.add_argument("--reference", choices=list(ARMS), default="global", help="as for run")
    timing.add_argument("overrides", nargs="*", help="ttt-train overrides, as given to run (after --)")
    one = commands.add_parser("score", help="held-out NLL by position of one run or checkpoint")
    one.add_argument("target", type=Path, help="a run directory (its last checkpoint) or a checkpoints/step-N")
    one.add_argument("--data", required=True, help="documents: a JSONL with a 'text' field, or what prepare_data reads")
    one.add_argument("--tokenizer", type=Path, required=True, help="the run's tokenizer folder")
    one.add_argument("--documents", type=positive_int, help="at most this many documents (default: every long one)")
    one.add_argument("--out", type=Path, help="write the scores as JSON here")
    args = parser.parse_args(argv)
    try:
        if args.command == "score":
            scored = score(args.target, args.data, args.tokenizer, args.documents)
            if args.out:
                write_json_atomically(args.out, scored)
            print(json.dumps({"documents": scored["documents"], **scored["regions"]}))
            return
        if args.command == "speed":
            measure_speed(args.out, args.arms, args.overrides, args.steps)
            report = write_report(args.out, args.reference)
        else:
            report = run_grid(args.out, args.arms, args.seeds, args.overrides, args.jobs, args.reference)
    except (ValueError, DataError, OSError, RuntimeError) as err:
        parser.exit(1, f"lm_study: error: {str(err).splitlines()[0]}\n")
    print(report_table(report["runs"], report["reference"], report["speed"]) + "\n\n" + position_table(report["runs"]))
    took = f"grid done in {report['wall_seconds']} s; " if report["wall_seconds"] is not None else ""
    _say(f"{took}report: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
