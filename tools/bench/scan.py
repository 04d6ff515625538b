"""Time the fast-weight chunk scan on a GPU: the Triton kernels at several tile shapes against the torch loop.

    python -m tools.bench.scan [--seq-len 32768] [--hidden 1024] [--intermediate 3072] [--chunk-size 512]
                               [--out bench_scan.json]

One forward + backward of `chunk_scan` on one document of S tokens under bf16 autocast (as the trainer runs it):
Z (S x h) and V (S x d) in bf16, fp32 states. Rows:
- `triton <forward> / <read grad> / <reverse>`: the kernels (trainer/ops/fastweight/chunk_triton.py) with those
  (BLOCK_T, BLOCK_D, BLOCK_H, warps) per kernel; the first row is the shipped default;
- `torch loop`: the CPU path (`_ChunkScan`: one bmm per segment) on the GPU, what ran before the kernels;
- `matmul floor`: the scan's products as plain cuBLAS bf16 matmuls of the same FLOPs (what tensor cores
  give when nothing else is in the way): forward 2 and backward 5 products of 2 S d h FLOPs each.

Each row: forward, backward and total milliseconds (median over repeats, CUDA events) and the total's
TFLOP/s over those 7 products; the JSON has every number and the device. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from tools.cli import OneLineErrorParser, positive_int
from trainer.ops.fastweight.layout import build_layout

NO_GPU_LINE = "tools.bench.scan needs a CUDA GPU: nothing measured"
REPEATS = 5
# (forward, read grad, reverse) blocks, each (BLOCK_T, BLOCK_D, BLOCK_H, num_warps); the default comes first.
CONFIGS = (
    None,
    ((64, 64, 128, 8), (64, 128, 64, 8), (64, 64, 64, 8)),
    ((64, 64, 256, 8), (64, 256, 64, 8), (64, 64, 128, 8)),
    ((32, 64, 128, 4), (32, 128, 64, 4), (32, 64, 64, 4)),
)
PRODUCTS = 7  # forward: read and write; backward: write (recomputed), read's gradient, gV, gZ, the state's gradient


def _median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_scan(seq_len: int, d: int, h: int, chunk: int, repeats: int = REPEATS) -> tuple[float, float]:
    """(forward ms, backward ms) of the scan as `chunk_scan` dispatches it now."""
    from trainer.ops.fastweight import chunk_scan

    z = torch.randn(1, seq_len, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, seq_len, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, seq_len, d, device="cuda", dtype=torch.bfloat16)
    layout = build_layout(torch.arange(seq_len, device="cuda").unsqueeze(0), chunk)
    lr = 1.0 / (chunk * h)
    holder = {}

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            holder["out"] = chunk_scan(z, v, layout, lr)[0]

    def backward():
        holder["out"].backward(grad)

    forward(), backward()  # compiles the kernels
    forward_ms = _median_ms(forward, repeats)
    backward_times = []
    for _ in range(repeats):
        forward()
        backward_times.append(_median_ms(backward, 1))
    return forward_ms, statistics.median(backward_times)


def time_matmul_floor(seq_len: int, d: int, h: int, repeats: int = REPEATS) -> tuple[float, float]:
    """The scan's products as plain matmuls: forward Z D^T and V^T Z; backward 5 of the same sizes."""
    z = torch.randn(seq_len, h, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(seq_len, d, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(d, h, device="cuda", dtype=torch.bfloat16)
    forward = _median_ms(lambda: (z @ state.T, v.T @ z), repeats)
    backward = _median_ms(lambda: (v.T @ z, v @ state, z @ state.T, v @ state, v.T @ z), repeats)
    return forward, backward


def _row(name: str, forward_ms: float, backward_ms: float, flops: float) -> dict:
    total = forward_ms + backward_ms
    return {"name": name, "forward_ms": forward_ms, "backward_ms": backward_ms, "total_ms": total,
            "tflops": flops / (total * 1e-3) / 1e12}  # fmt: skip


def _config_name(config) -> str:
    import trainer.ops.fastweight.chunk_triton as kernels

    blocks = config or (kernels.FORWARD_BLOCKS, kernels.READ_GRAD_BLOCKS, kernels.REVERSE_BLOCKS)
    return "triton " + " / ".join("x".join(map(str, b)) for b in blocks) + (" (default)" if config is None else "")


def benchmark(seq_len: int, d: int, h: int, chunk: int) -> list[dict]:
    import trainer.ops.fastweight as fastweight
    import trainer.ops.fastweight.chunk_triton as kernels

    flops = PRODUCTS * 2 * seq_len * d * h
    rows = []
    defaults = kernels.FORWARD_BLOCKS, kernels.READ_GRAD_BLOCKS, kernels.REVERSE_BLOCKS
    for config in CONFIGS:
        name = _config_name(config)
        kernels.FORWARD_BLOCKS, kernels.READ_GRAD_BLOCKS, kernels.REVERSE_BLOCKS = config or defaults
        try:
            rows.append(_row(name, *time_scan(seq_len, d, h, chunk), flops))
        except Exception as err:  # a tile shape the GPU cannot hold (registers, shared memory) is a row, not a stop
            rows.append({"name": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"})
        finally:
            kernels.FORWARD_BLOCKS, kernels.READ_GRAD_BLOCKS, kernels.REVERSE_BLOCKS = defaults
    runs_triton = fastweight._runs_triton
    fastweight._runs_triton = lambda *args: False
    try:
        rows.append(_row("torch loop", *time_scan(seq_len, d, h, chunk, repeats=2), flops))
    finally:
        fastweight._runs_triton = runs_triton
    rows.append(_row("matmul floor (cuBLAS)", *time_matmul_floor(seq_len, d, h), flops))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| scan | forward ms | backward ms | total ms | TFLOP/s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} | | | |")
        else:
            lines.append(
                f"| {r['name']} | {r['forward_ms']:.2f} | {r['backward_ms']:.2f} | {r['total_ms']:.2f} | "
                f"{r['tflops']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m tools.bench.scan", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seq-len", type=positive_int, default=32768)
    parser.add_argument("--hidden", type=positive_int, default=1024, help="d (default: Qwen3-0.6B's 1024)")
    parser.add_argument("--intermediate", type=positive_int, default=3072, help="h (default: Qwen3-0.6B's 3072)")
    parser.add_argument("--chunk-size", type=positive_int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench_scan.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU_LINE)
        return
    rows = benchmark(args.seq_len, args.hidden, args.intermediate, args.chunk_size)
    print(f"chunk scan, S={args.seq_len}, d={args.hidden}, h={args.intermediate}, C={args.chunk_size}, bf16 autocast")
    print(markdown(rows))
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": vars(args), "rows": rows}
    report["shape"]["out"] = str(args.out)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
