"""Peak memory and time of one TTT layer's fast-weight part: chunk scan vs prefix sum vs plain MLP.

Each measurement is one forward + backward of a single layer, fp32, batch 1, one document:

    z   = silu(x W_gate^T) * (x W_up^T)       x (1, S, d) requires grad; W_gate, W_up (h x d)
    v   = x @ P                               the value target is part of the graph, as in the real layer
    out = z W_down^T + fast(z, v)             out.backward(fixed random gradient)

with `fast` one of
    mlp     no fast part (the plain gated MLP, the baseline the others are compared against),
    scan    `trainer.ops.fastweight.chunk_scan` (custom autograd Function, O(1) d x h states),
    prefix  `trainer.ops.fastweight.naive_fastweight` (prefix sum, one d x h weight per chunk).

"extra" is a variant's number minus the plain MLP's at the same S. Reported per variant:
- peak memory of the fwd+bwd above the memory held just before it: the most bytes tensors held
  (`tools.measure.peak_bytes`: on CPU the profiler's allocation record, on CUDA max_memory_allocated);
- saved activation bytes: unique storages packed by saved_tensors_hooks, excluding the inputs and
  parameters (deterministic, a noise-free companion to the peak);
- median wall time over --repeats fwd+bwd runs.

Every (variant, S) runs in a fresh subprocess (`--one VARIANT S`), so none inherits another's caches:
apart from a two-chunk warm-up, the measured step is the first thing that child does.
The scan is hundreds of small ops: when other processes compete for the cores, multi-threaded runs
of it slow down many-fold (idle worker threads spin), so time on an idle machine or with --threads 1.

The acceptance point is S=8192, C=16 (512 chunks): the scan's extra peak over a plain MLP must be at
most a quarter of the prefix sum's, and its time no worse.

    python -m tools.bench.fastweight              # d=128, h=2048, C=16, S in 1024 2048 4096 8192
    python -m tools.bench.fastweight --quick      # S in 512 1024 2048, well under a minute
    python -m tools.bench.fastweight --seq-lens 4096 16384 --chunk-size 64 --json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from tools.cli import OneLineErrorParser, positive_int
from tools.measure import MIB, peak_bytes, synchronize
from trainer.ops.fastweight import chunk_scan, naive_fastweight
from trainer.ops.fastweight.layout import build_layout

VARIANTS = ("mlp", "scan", "prefix")
DEFAULT_SEQ_LENS = (1024, 2048, 4096, 8192)
QUICK_SEQ_LENS = (512, 1024, 2048)
DEFAULT_REPEATS = 3
QUICK_REPEATS = 2
MEMORY_RATIO_LIMIT = 0.25
TIME_RATIO_LIMIT = 1.0
LR = 0.01
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Shape:
    seq_len: int
    chunk_size: int
    hidden: int
    intermediate: int

    @property
    def chunks(self) -> int:
        return math.ceil(self.seq_len / self.chunk_size)


@dataclass(frozen=True)
class Measurement:
    peak_mib: float
    saved_mib: float
    ms: float


# --- child: one (variant, S) in this process -------------------------------------------------------


@dataclass
class _Layer:
    x: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    proj: torch.Tensor
    grad_out: torch.Tensor

    def leaves(self) -> list[torch.Tensor]:
        return [self.x, self.w_gate, self.w_up, self.w_down, self.proj]


def _build_layer(shape: Shape, device: torch.device) -> _Layer:
    torch.manual_seed(0)
    d, h, s = shape.hidden, shape.intermediate, shape.seq_len

    def leaf(*size: int, scale: float) -> torch.Tensor:
        return (torch.randn(*size, device=device) * scale).requires_grad_()

    return _Layer(
        x=leaf(1, s, d, scale=1.0),
        w_gate=leaf(h, d, scale=d**-0.5),
        w_up=leaf(h, d, scale=d**-0.5),
        w_down=leaf(d, h, scale=h**-0.5),
        proj=leaf(d, d, scale=d**-0.5),
        grad_out=torch.randn(1, s, d, device=device),
    )


def _make_forward(variant: str, layer: _Layer, shape: Shape) -> Callable[[], torch.Tensor]:
    position_ids = torch.arange(shape.seq_len, device=layer.x.device).unsqueeze(0)
    # Built once outside the timed step: a patched model builds it once per forward for all layers.
    layout = build_layout(position_ids, shape.chunk_size)

    def forward() -> torch.Tensor:
        z = F.silu(F.linear(layer.x, layer.w_gate)) * F.linear(layer.x, layer.w_up)
        out = F.linear(z, layer.w_down)
        if variant == "mlp":
            return out
        v = layer.x @ layer.proj
        if variant == "scan":
            return out + chunk_scan(z, v, layout, LR)[0]
        return out + naive_fastweight(z, v, position_ids, shape.chunk_size, LR)

    return forward


def _make_step(forward: Callable[[], torch.Tensor], layer: _Layer) -> Callable[[], None]:
    def step() -> None:
        forward().backward(layer.grad_out)
        for leaf in layer.leaves():
            leaf.grad = None  # every step allocates its gradients afresh, like the first one

    return step


def _saved_activation_bytes(forward: Callable[[], torch.Tensor], layer: _Layer) -> int:
    """Bytes of the unique storages autograd keeps for backward, inputs and parameters excluded."""
    storage_bytes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storage_bytes[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    for leaf in layer.leaves():
        storage_bytes.pop(leaf.untyped_storage().data_ptr(), None)
    return sum(storage_bytes.values())


def _median_ms(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _warm_up(variant: str, shape: Shape, device: torch.device) -> None:
    """One fwd+bwd on two chunks, so one-time costs (thread pools, allocator caches, autograd engine)
    stay out of the measured step."""
    small = replace(shape, seq_len=2 * shape.chunk_size)
    layer = _build_layer(small, device)
    _make_step(_make_forward(variant, layer, small), layer)()


def measure(variant: str, shape: Shape, repeats: int) -> Measurement:
    """Peak first (it must be this process's largest step), then saved bytes, then time."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _warm_up(variant, shape, device)
    layer = _build_layer(shape, device)
    forward = _make_forward(variant, layer, shape)
    step = _make_step(forward, layer)
    peak = peak_bytes(step, device)
    saved = _saved_activation_bytes(forward, layer)
    return Measurement(peak_mib=peak / MIB, saved_mib=saved / MIB, ms=_median_ms(step, repeats, device))


# --- parent: one child per (variant, S), then the table --------------------------------------------


@dataclass(frozen=True)
class Row:
    shape: Shape
    mlp: Measurement
    scan: Measurement
    prefix: Measurement

    @property
    def scan_extra_mib(self) -> float:
        return self.scan.peak_mib - self.mlp.peak_mib

    @property
    def prefix_extra_mib(self) -> float:
        return self.prefix.peak_mib - self.mlp.peak_mib

    @property
    def memory_ratio(self) -> float:
        return self.scan_extra_mib / self.prefix_extra_mib if self.prefix_extra_mib > 0 else math.inf

    @property
    def time_ratio(self) -> float:
        return self.scan.ms / self.prefix.ms

    @property
    def memory_ok(self) -> bool:
        return self.memory_ratio <= MEMORY_RATIO_LIMIT

    @property
    def time_ok(self) -> bool:
        return self.time_ratio <= TIME_RATIO_LIMIT


def _measure_in_child(variant: str, shape: Shape, repeats: int, threads: int) -> Measurement:
    command = [
        sys.executable,
        "-m",
        "tools.bench.fastweight",
        "--one",
        variant,
        str(shape.seq_len),
        f"--chunk-size={shape.chunk_size}",
        f"--hidden={shape.hidden}",
        f"--intermediate={shape.intermediate}",
        f"--repeats={repeats}",
        f"--threads={threads}",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.PIPE, text=True)
    return Measurement(**json.loads(result.stdout))


def _measure_row(shape: Shape, repeats: int, threads: int) -> Row:
    measurements = {}
    for variant in VARIANTS:
        m = _measure_in_child(variant, shape, repeats, threads)
        print(
            f"S={shape.seq_len} {variant}: peak {m.peak_mib:.1f} MiB, saved {m.saved_mib:.1f} MiB, {m.ms:.1f} ms",
            file=sys.stderr,
            flush=True,
        )
        measurements[variant] = m
    return Row(shape, **measurements)


def _markdown_table(rows: list[Row]) -> str:
    header = (
        "| S | chunks | C | d | h | mlp peak MiB | scan extra MiB | prefix extra MiB | extra ratio (scan/prefix)"
        " | scan saved extra MiB | prefix saved extra MiB | mlp ms | scan ms | prefix ms | time ratio (scan/prefix) |"
    )
    lines = [header, "|" + "---:|" * header.count(" | ") + "---:|"]
    for r in rows:
        s = r.shape
        cells = [
            s.seq_len,
            s.chunks,
            s.chunk_size,
            s.hidden,
            s.intermediate,
            f"{r.mlp.peak_mib:.1f}",
            f"{r.scan_extra_mib:.1f}",
            f"{r.prefix_extra_mib:.1f}",
            f"{r.memory_ratio:.3f}",
            f"{r.scan.saved_mib - r.mlp.saved_mib:.1f}",
            f"{r.prefix.saved_mib - r.mlp.saved_mib:.1f}",
            f"{r.mlp.ms:.1f}",
            f"{r.scan.ms:.1f}",
            f"{r.prefix.ms:.1f}",
            f"{r.time_ratio:.2f}",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _caption(repeats: int, threads: int) -> str:
    device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else f"cpu, {threads} threads"
    return f"One layer's fwd+bwd, fp32, batch 1, one document, lr {LR}; {device}; time: median of {repeats}."


def _json_rows(rows: list[Row]) -> str:
    return json.dumps(
        [
            {
                **asdict(r),
                "memory_ratio": r.memory_ratio,
                "time_ratio": r.time_ratio,
                "memory_ok": r.memory_ok,
                "time_ok": r.time_ok,
            }
            for r in rows
        ],
        indent=2,
    )


def _acceptance_line(row: Row) -> str:
    memory = "ok" if row.memory_ok else "FAIL"
    speed = "ok" if row.time_ok else "FAIL"
    return (
        f"acceptance S={row.shape.seq_len}: memory ratio {row.memory_ratio:.3f} <= {MEMORY_RATIO_LIMIT} {memory}; "
        f"time ratio {row.time_ratio:.2f} <= {TIME_RATIO_LIMIT} {speed}"
    )


# --- command line ----------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m tools.bench.fastweight", description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--seq-lens", type=positive_int, nargs="+", help=f"default {' '.join(map(str, DEFAULT_SEQ_LENS))}"
    )
    parser.add_argument("--chunk-size", type=positive_int, default=16, help="C (default 16)")
    parser.add_argument("--hidden", type=positive_int, default=128, help="d (default 128)")
    parser.add_argument("--intermediate", type=positive_int, default=2048, help="h (default 2048)")
    parser.add_argument("--repeats", type=positive_int, help=f"timed fwd+bwd runs (default {DEFAULT_REPEATS})")
    parser.add_argument(
        "--threads", type=positive_int, default=torch.get_num_threads(), help="CPU threads (default: torch's)"
    )
    parser.add_argument("--quick", action="store_true", help=f"small fast run: S in {QUICK_SEQ_LENS}, fewer repeats")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--markdown", dest="output", action="store_const", const="markdown", help="table (default)")
    output.add_argument("--json", dest="output", action="store_const", const="json", help="rows as JSON")
    parser.add_argument(
        "--one", nargs=2, metavar=("VARIANT", "S"), help="internal: measure one (variant, S) here and print JSON"
    )
    args = parser.parse_args(argv)
    if args.quick and args.seq_lens:
        parser.error("--quick picks its own sequence lengths; drop --seq-lens")
    args.seq_lens = args.seq_lens or (QUICK_SEQ_LENS if args.quick else DEFAULT_SEQ_LENS)
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if args.one:
        variant, seq_len = args.one
        if variant not in VARIANTS:
            parser.error(f"--one: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        try:
            args.one = (variant, positive_int(seq_len))
        except argparse.ArgumentTypeError as err:
            parser.error(f"--one: {err}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)

    def shape(seq_len: int) -> Shape:
        return Shape(seq_len, args.chunk_size, args.hidden, args.intermediate)

    torch.set_num_threads(args.threads)
    if args.one:
        variant, seq_len = args.one
        print(json.dumps(asdict(measure(variant, shape(seq_len), args.repeats))))
        return
    rows = [_measure_row(shape(seq_len), args.repeats, args.threads) for seq_len in args.seq_lens]
    if args.output == "json":
        print(_json_rows(rows))
        acceptance_stream = sys.stderr  # keep stdout parseable
    else:
        print(_caption(args.repeats, args.threads))
        print()
        print(_markdown_table(rows))
        acceptance_stream = sys.stdout
    for row in rows:
        print(_acceptance_line(row), file=acceptance_stream)


if __name__ == "__main__":
    main()
