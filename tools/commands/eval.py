"""Long-context evaluation of a TTT model: perplexity by position, a RULER-style suite, a needle-in-a-haystack heatmap.

    ttt-eval MODEL [--tasks ppl,ruler,niah] [--lengths 4096,8192,...] [--samples N]
                         [--tokenizer DIR] [--out DIR] [--wandb-mode offline|online|disabled] ...

MODEL is a Hugging Face folder (`tools.commands.export_hf`, or the In-Place TTT release) or a run's
checkpoints/step-N. With --tokenizer the tasks are text (RULER's templates); without it they are the
tokenizer-free versions (for tiny models). OUT (default MODEL/eval, or RUN/eval/step-N for a checkpoint)
is written under a temporary name and renamed when complete:

    ppl.json   ppl.png    mean NLL / perplexity per position bucket, and its line plot
    ruler.json ruler.md   RULER string-match score per task x length (fraction; the table in percent)
    niah.json  niah.png   single-needle score per depth x length, and its heatmap
    wandb/                the W&B run with all of the above (offline: `wandb sync OUT/wandb/offline-run-*`)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from tools.cli import OneLineErrorParser, names_from, positive_int
from tools.commands.eval_inputs import load_model, load_tokenizer, perplexity_documents
from trainer.config import WandbConfig
from trainer.evaluation.perplexity import SPACINGS, bucket_edges, nll_by_position
from trainer.evaluation.recall import NIAH_TASK, RULER_TASKS, RecallScorer, score_cells
from trainer.evaluation.report import markdown_table, plot_heatmap, plot_nll_by_position
from trainer.model import DTYPES
from trainer.tracking import WandbRun, write_json_atomically

PARTS = ("ppl", "ruler", "niah")
DEFAULT_LENGTHS = [2**k for k in range(12, 19)]  # 4k .. 256k


def _lengths(text: str) -> list[int]:
    """ "4096,8k,256k" -> [4096, 8192, 262144]."""
    try:
        lengths = [int(part[:-1]) * 1024 if part.lower().endswith("k") else int(part) for part in text.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 2:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts >= 2 (e.g. 4096,8k), got {text!r}")
    return sorted(set(lengths))


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="ttt-eval", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a Hugging Face folder or a run's checkpoints/step-N")
    parser.add_argument("--tasks", type=names_from(PARTS), default=list(PARTS), help="parts to run: ppl,ruler,niah")
    parser.add_argument("--ruler-tasks", type=names_from(tuple(RULER_TASKS)), default=list(RULER_TASKS),
                        help=f"suite tasks (default: all of {','.join(RULER_TASKS)})")  # fmt: skip
    parser.add_argument("--lengths", type=_lengths, default=DEFAULT_LENGTHS, help="context lengths (default 4k..256k)")
    parser.add_argument("--samples", type=positive_int, default=25, help="samples per task x length and per NIAH cell")
    parser.add_argument("--depths", type=positive_int, default=11, help="NIAH needle depths, evenly in [0, 1]")
    parser.add_argument("--tokenizer", type=Path, help="a local tokenizer folder: text tasks (else tokenizer-free)")
    parser.add_argument("--ppl-data", help="a JSONL (\"text\" per line) or text file, or a generator name "
                        "(default: synthetic_recall, or synthetic_recall_text with --tokenizer)")  # fmt: skip
    parser.add_argument("--ppl-documents", type=positive_int, default=8, help="documents for perplexity")
    parser.add_argument("--ppl-length", type=positive_int, help="tokens per document (default: the longest length)")
    parser.add_argument("--ppl-buckets", type=positive_int, default=8, help="position buckets")
    parser.add_argument("--ppl-spacing", choices=SPACINGS, default="log", help="bucket widths doubling or equal")
    parser.add_argument("--piece-tokens", type=positive_int, default=4096, help="positions per forward for perplexity")
    parser.add_argument("--extra-tokens", type=int, default=8, help="tokens generated beyond the answers' length")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated samples")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the model (default: as stored)")
    parser.add_argument("--clip", type=float, help="inference-only fast-weight clip tau (Hugging Face folders)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="output folder to create (default: MODEL/eval or RUN/eval/step-N)")
    parser.add_argument("--wandb-mode", choices=("online", "offline", "disabled"), default="offline")
    parser.add_argument("--wandb-project", default="ttt-longctx")
    parser.add_argument("--wandb-name", help="W&B run name (default: eval-<model folder name>)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    out = args.out or (args.model / "eval" if (args.model / "config.json").is_file() else
                       args.model.parent.parent / "eval" / args.model.name)  # fmt: skip
    if out.exists():
        parser.error(f"{out} already exists (pass another --out)")
    try:
        model = load_model(args.model, args.dtype, args.clip).to(args.device)
        tokenizer = load_tokenizer(args.tokenizer, model.config.vocab_size) if args.tokenizer else None
        scorer = RecallScorer(model, tokenizer, str(args.tokenizer) if tokenizer else None, args.extra_tokens)
        ruler, niah, depths = _cells(scorer, args)
        documents = _documents(args, model.config.vocab_size, tokenizer) if "ppl" in args.tasks else []
    except (ValueError, OSError) as err:
        parser.error(str(err).splitlines()[0])

    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an evaluation that crashed
    partial.mkdir(parents=True)
    try:
        logged: dict = {}
        if documents:
            logged |= _perplexity(model, documents, args, partial)
        total = args.samples * (len(ruler) + len(niah))
        with tqdm(total=total, desc="generating", unit="sample", disable=None) as progress:
            if ruler:
                logged |= _ruler(scorer, ruler, args, partial, progress)
            if niah:
                logged |= _niah(scorer, niah, depths, args, partial, progress)
        _log_to_wandb(args, logged, partial)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {out}", file=sys.stderr)


def _cells(scorer: RecallScorer, args) -> tuple[dict, dict, list[float]]:
    """The datasets of every suite cell and NIAH cell, built up front so that a length a task does not
    fit in is an error before any work."""
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    ruler, niah = {}, {}
    for length in args.lengths:
        for task in args.ruler_tasks if "ruler" in args.tasks else ():
            ruler[task, length] = _dataset(scorer, RULER_TASKS[task], length, args.seed, task)
        for depth in depths if "niah" in args.tasks else ():
            niah[depth, length] = _dataset(scorer, NIAH_TASK, length, args.seed, "niah", depth=depth)
    return ruler, niah, depths


def _dataset(scorer, task, length, seed, label, **knobs):
    try:
        return scorer.dataset(task, length, seed, **knobs), task.one_question
    except ValueError as err:
        raise ValueError(f"{label} at length {length}: {err}") from err


def _documents(args, vocab_size: int, tokenizer) -> list[torch.Tensor]:
    source = args.ppl_data or ("synthetic_recall_text" if tokenizer else "synthetic_recall")
    length = args.ppl_length or max(args.lengths)
    tokenizer_dir = str(args.tokenizer) if tokenizer else None
    return perplexity_documents(source, length, args.ppl_documents, vocab_size, tokenizer, tokenizer_dir)


def _perplexity(model, documents, args, out: Path) -> dict:
    length = args.ppl_length or max(args.lengths)
    edges = bucket_edges(length, args.ppl_buckets, args.ppl_spacing)
    progress = tqdm(documents, desc="perplexity", unit="document", disable=None)
    result = nll_by_position(model, (ids.to(args.device) for ids in progress), edges, args.piece_tokens)
    write_json_atomically(out / "ppl.json", {"length": length, "spacing": args.ppl_spacing, **result})
    plot_nll_by_position(result, out / "ppl.png", args.ppl_spacing == "log")
    scalars = {f"ppl/nll/{b['start']}-{b['end']}": b["nll"] for b in result["buckets"] if b["tokens"]}
    return {**scalars, "ppl/nll": result["nll"], "ppl/ppl": result["ppl"], "image:ppl/plot": "ppl.png"}


def _ruler(scorer, cells: dict, args, out: Path, progress) -> dict:
    scores = score_cells(scorer, cells, args.samples, progress)
    table = {task: {length: scores[task, length] for length in args.lengths} for task in args.ruler_tasks}
    means = {length: sum(row[length] for row in table.values()) / len(table) for length in args.lengths}
    write_json_atomically(out / "ruler.json", {
        "mode": "text" if scorer.tokenizer else "tokenizer-free", "lengths": args.lengths, "samples": args.samples,
        "scores": {task: {str(length): {"score": s, "n": args.samples} for length, s in row.items()}
                   for task, row in table.items()},
        "mean": {str(length): mean for length, mean in means.items()},
    })  # fmt: skip
    markdown = markdown_table(table, args.lengths)
    (out / "ruler.md").write_text(markdown)
    print(markdown)
    scalars = {f"ruler/{task}/{length}": score for (task, length), score in scores.items()}
    rows = [[task, *(row[length] for length in args.lengths)] for task, row in table.items()]
    return {**scalars, **{f"ruler/mean/{length}": mean for length, mean in means.items()},
            "table:ruler/table": (["task", *map(str, args.lengths)], rows)}  # fmt: skip


def _niah(scorer, cells: dict, depths: list[float], args, out: Path, progress) -> dict:
    scores = score_cells(scorer, cells, args.samples, progress)
    grid = [[scores[depth, length] for length in args.lengths] for depth in depths]
    write_json_atomically(out / "niah.json", {
        "mode": "text" if scorer.tokenizer else "tokenizer-free", "lengths": args.lengths, "depths": depths,
        "samples": args.samples, "scores": grid,
    })  # fmt: skip
    plot_heatmap(grid, depths, args.lengths, out / "niah.png")
    scalars = {f"niah/{length}/depth-{depth:.2f}": score for (depth, length), score in scores.items()}
    return {**scalars, "image:niah/heatmap": "niah.png"}


def _log_to_wandb(args, logged: dict, out: Path) -> None:
    """One W&B run in out/wandb with the results as step 0: scalars as they are, "image:KEY" (a file in
    `out`) and "table:KEY" ((columns, rows)) as media. Started only now: a W&B process running beside the
    evaluation slows it down a lot on a few CPU cores."""
    name = args.wandb_name or f"eval-{args.model.resolve().name}"
    config = WandbConfig(args.wandb_mode, args.wandb_project, None, None, ("eval",))
    wandb_run = WandbRun(config, out, _settings(args), None, name)
    if wandb_run.run is None:
        return
    try:
        import wandb

        record = {}
        for key, value in logged.items():
            kind, _, name = key.partition(":") if ":" in key else ("", "", key)
            if kind == "image":
                record[name] = wandb.Image(str(out / value))
            elif kind == "table":
                record[name] = wandb.Table(columns=value[0], data=value[1])
            else:
                record[name] = value
    except Exception as err:  # W&B must never fail the evaluation
        warnings.warn(f"wandb: cannot log the results ({err})", stacklevel=2)
    else:
        wandb_run.log(record, step=0)
    wandb_run.finish()


def _settings(args) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


if __name__ == "__main__":
    main()
