"""Fused linear cross-entropy on one CUDA GPU: liger-kernel's, cut-cross-entropy's, the torch path.

    python -m tools.bench.loss [--tokens 32768 --hidden 1024 --vocab 151936 --repeats 5 --out bench_loss.json]

The project's rule for its loss head: measure it side by side with the libraries a user would pick instead and
depend on the winner. Its own Triton kernels lost to liger-kernel on an H200 (261 against 73 ms fwd+bwd at the
default shape) and were removed; this compares liger (what the trainer runs) with cut-cross-entropy. Candidates,
each the sum over tokens of CE(hidden @ head^T, labels) ignoring IGNORE_INDEX:
- liger-kernel: `trainer.ops.loss.linear_cross_entropy`, which the trainer calls (on CUDA it runs liger's
  fused linear cross-entropy, reduction "sum", the head's gradient accumulated in fp32);
- cut-cross-entropy: `cut_cross_entropy.linear_cross_entropy`, reduction "sum", its default implementation (cce,
  which skips gradient blocks below its default filter_eps);
- torch chunked: the trainer's CPU path (`_LinearCrossEntropy`, chunks of 4096 tokens, fp32 logits).

Inputs: bf16 hidden states (tokens x d) and head (vocab x d), random normal, the head scaled by d**-0.5 so the
logits are O(1); 5% of the labels ignored. The backward starts from the loss times 1 / (labels counted), the
trainer's mean over tokens. Per candidate:
- fwd, bwd, fwd+bwd ms: medians over --repeats runs after two warm-up runs, from torch.cuda.Event stamps before
  the forward, between forward and backward, and after the backward (liger computes the gradients in its
  forward, so its bwd is small; cut-cross-entropy recomputes the logits in its backward);
- peak GiB: torch.cuda.max_memory_allocated over one fwd+bwd minus what was allocated before it (the inputs
  are allocated before; their gradients, (tokens + vocab) x d bf16, are part of every candidate's peak);
- accuracy: ||got - want|| / ||want|| of the loss and of both gradients, against `naive_linear_cross_entropy`
  in fp64 on the same bf16 inputs, at --accuracy-tokens x d x --accuracy-vocab (default 4096 x d x 40003, so
  the fp64 logits fit; wider than liger's 32768-column kernel block, whose loop the CPU tests cannot reach).
A candidate whose package is missing or that raises is a row with its one-line error and what it measured
before; the others still run. Prints a markdown table and writes every number, the device name and the
versions to --out. Without a CUDA GPU it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from parallel.sharding import IGNORE_INDEX
from tools.cli import OneLineErrorParser, positive_int
from tools.measure import peak_bytes, synchronize
from trainer.ops.loss import linear_cross_entropy, naive_linear_cross_entropy

NO_GPU_LINE = "python -m tools.bench.loss needs a CUDA GPU; none found, nothing measured"
GIB = 2**30
IGNORED_FRACTION = 0.05
WARMUP = 2
TORCH_CHUNK = inspect.signature(linear_cross_entropy).parameters["chunk_size"].default
PACKAGES = ("torch", "triton", "liger-kernel", "cut-cross-entropy")

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --- the candidates: each loader imports its package and returns loss(hidden, head, labels) -------------------


def _liger() -> Loss:
    import liger_kernel  # noqa: F401  missing, it is this row's error; linear_cross_entropy would take the torch path

    return linear_cross_entropy


def _cut_cross_entropy() -> Loss:
    from cut_cross_entropy import linear_cross_entropy as cce

    def loss(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cce(hidden, head, labels, ignore_index=IGNORE_INDEX, reduction="sum")

    return loss


def _torch_chunked() -> Loss:
    from trainer.ops.loss import _LinearCrossEntropy

    def loss(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _LinearCrossEntropy.apply(hidden, head, labels, TORCH_CHUNK)

    return loss


CANDIDATES: dict[str, Callable[[], Loss]] = {
    "liger-kernel": _liger,
    "cut-cross-entropy": _cut_cross_entropy,
    "torch chunked": _torch_chunked,
}
REFERENCE = "liger-kernel"  # what the trainer runs: the table's ratio column divides by its time


# --- inputs and the fp64 reference ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    vocab: int


@dataclass
class Inputs:
    hidden: torch.Tensor  # (tokens, d) bf16, requires grad
    head: torch.Tensor  # (vocab, d) bf16, requires grad
    labels: torch.Tensor
    scale: float  # 1 / labels counted: the backward starts from the trainer's mean over tokens

    def clear_grads(self) -> None:
        self.hidden.grad = self.head.grad = None


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> Inputs:
    generator = torch.Generator(device).manual_seed(seed)

    def normal(*size: int, scale: float = 1.0) -> torch.Tensor:
        values = torch.randn(*size, device=device, generator=generator) * scale
        return values.bfloat16().requires_grad_()

    labels = torch.randint(0, shape.vocab, (shape.tokens,), device=device, generator=generator)
    labels[torch.rand(shape.tokens, device=device, generator=generator) < IGNORED_FRACTION] = IGNORE_INDEX
    counted = max(int((labels != IGNORE_INDEX).sum()), 1)
    return Inputs(
        hidden=normal(shape.tokens, shape.hidden),
        head=normal(shape.vocab, shape.hidden, scale=shape.hidden**-0.5),
        labels=labels,
        scale=1.0 / counted,
    )


def _loss_and_grads(loss: Loss, hidden: torch.Tensor, head: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
    value = loss(hidden, head, inputs.labels)
    return [value.detach(), *torch.autograd.grad(value * inputs.scale, (hidden, head))]


def fp64_reference(inputs: Inputs) -> list[torch.Tensor]:
    """The loss and both gradients of `naive_linear_cross_entropy` in fp64 on the same (bf16) values."""
    hidden, head = (t.detach().double().requires_grad_() for t in (inputs.hidden, inputs.head))
    return _loss_and_grads(naive_linear_cross_entropy, hidden, head, inputs)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


# --- measuring one candidate --------------------------------------------------------------------------------------


@dataclass
class Row:
    candidate: str
    forward_ms: float | None = None
    backward_ms: float | None = None
    total_ms: float | None = None
    peak_gib: float | None = None
    loss_error: float | None = None
    grad_hidden_error: float | None = None
    grad_head_error: float | None = None
    error: str | None = None  # the first line of what went wrong; the fields above hold what was measured before

    @property
    def backward_per_forward(self) -> float | None:
        return self.backward_ms / self.forward_ms if self.forward_ms else None


def _stamp(device: torch.device) -> torch.cuda.Event | float:
    """Now on the device's stream (CUDA) or the host's clock; read with `_ms_between` after synchronizing."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _ms_between(start: torch.cuda.Event | float, end: torch.cuda.Event | float) -> float:
    return start.elapsed_time(end) if isinstance(start, torch.cuda.Event) else (end - start) * 1e3


def _fwd_bwd_ms(loss: Loss, inputs: Inputs, device: torch.device) -> tuple[float, float]:
    inputs.clear_grads()
    start = _stamp(device)
    value = loss(inputs.hidden, inputs.head, inputs.labels)
    between = _stamp(device)
    (value * inputs.scale).backward()
    end = _stamp(device)
    synchronize(device)
    return _ms_between(start, between), _ms_between(between, end)


def _measure_accuracy(row: Row, loss: Loss, small: Inputs, reference: list[torch.Tensor]) -> None:
    got = _loss_and_grads(loss, small.hidden, small.head, small)
    row.loss_error, row.grad_hidden_error, row.grad_head_error = map(_relative_error, got, reference)


def _measure_speed(row: Row, loss: Loss, inputs: Inputs, repeats: int, device: torch.device) -> None:
    for _ in range(WARMUP):  # compilation, autotuning, allocator caches
        _fwd_bwd_ms(loss, inputs, device)
    inputs.clear_grads()
    row.peak_gib = peak_bytes(lambda: _fwd_bwd_ms(loss, inputs, device), device) / GIB
    runs = [_fwd_bwd_ms(loss, inputs, device) for _ in range(repeats)]
    row.forward_ms = statistics.median(f for f, _ in runs)
    row.backward_ms = statistics.median(b for _, b in runs)
    row.total_ms = statistics.median(f + b for f, b in runs)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def measure(
    name: str,
    load: Callable[[], Loss],
    inputs: Inputs,
    small: Inputs,
    reference: list[torch.Tensor],
    repeats: int,
    device: torch.device,
) -> Row:
    """Accuracy first (small and quick), then time and memory at the full shape."""
    row = Row(name)
    try:
        loss = load()
        _measure_accuracy(row, loss, small, reference)
        _measure_speed(row, loss, inputs, repeats, device)
    except Exception as err:  # a missing package or a crashing kernel is this row's result; the others still run
        row.error = _first_line(err)
    finally:
        inputs.clear_grads()
        small.clear_grads()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what one candidate's allocator cached is not the next one's peak
    return row


def measure_all(
    candidates: dict[str, Callable[[], Loss]], shape: Shape, accuracy_shape: Shape, repeats: int, device: torch.device
) -> list[Row]:
    small = make_inputs(accuracy_shape, device, seed=1)
    reference = fp64_reference(small)
    inputs = make_inputs(shape, device)
    return [measure(name, load, inputs, small, reference, repeats, device) for name, load in candidates.items()]


# --- report ---------------------------------------------------------------------------------------------------------


def _cell(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(rows: list[Row]) -> str:
    reference = next((r.total_ms for r in rows if r.candidate == REFERENCE), None)
    lines = [
        f"| candidate | fwd ms | bwd ms | fwd+bwd ms | bwd/fwd | fwd+bwd / {REFERENCE} | peak GiB | loss err"
        " | grad hidden err | grad head err | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = r.total_ms / reference if r.total_ms is not None and reference else None
        cells = [
            r.candidate,
            _cell(r.forward_ms, ".1f"),
            _cell(r.backward_ms, ".1f"),
            _cell(r.total_ms, ".1f"),
            _cell(r.backward_per_forward, ".2f"),
            _cell(ratio, ".2f"),
            _cell(r.peak_gib, ".2f"),
            _cell(r.loss_error, ".1e"),
            _cell(r.grad_hidden_error, ".1e"),
            _cell(r.grad_head_error, ".1e"),
            r.error or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _caption(shape: Shape, accuracy_shape: Shape, repeats: int, device_name: str) -> str:
    return (
        f"{device_name}; bf16 hidden {shape.tokens} x {shape.hidden}, head {shape.vocab} x {shape.hidden} "
        f"(x d**-0.5), {IGNORED_FRACTION:.0%} of labels ignored; times: medians of {repeats} after {WARMUP} warm-ups; "
        f"errors against fp64 at {accuracy_shape.tokens} x {accuracy_shape.hidden} x {accuracy_shape.vocab}."
    )


def _versions() -> dict[str, str | None]:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {**{package: version(package) for package in PACKAGES}, "cuda": torch.version.cuda}


def report_json(rows: list[Row], shape: Shape, accuracy_shape: Shape, repeats: int, device_name: str) -> dict:
    return {
        "device": device_name,
        "versions": _versions(),
        "shape": asdict(shape),
        "accuracy_shape": asdict(accuracy_shape),
        "dtype": "bfloat16",
        "ignored_fraction": IGNORED_FRACTION,
        "warmup": WARMUP,
        "repeats": repeats,
        "rows": [{**asdict(r), "backward_per_forward": r.backward_per_forward} for r in rows],
    }


# --- command line ---------------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m tools.bench.loss", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tokens", type=positive_int, default=32768, help="N (default 32768)")
    parser.add_argument("--hidden", type=positive_int, default=1024, help="d (default 1024)")
    parser.add_argument("--vocab", type=positive_int, default=151936, help="V (default 151936, Qwen3's)")
    parser.add_argument("--accuracy-tokens", type=positive_int, default=4096, help="N of the fp64 check (4096)")
    parser.add_argument("--accuracy-vocab", type=positive_int, default=40003, help="V of the fp64 check (40003)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed fwd+bwd runs (default 5)")
    parser.add_argument("--out", type=Path, default=Path("bench_loss.json"), help="JSON (default bench_loss.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU_LINE)
        return
    device = torch.device("cuda")
    device_name = torch.cuda.get_device_name(device)
    shape = Shape(args.tokens, args.hidden, args.vocab)
    accuracy_shape = Shape(args.accuracy_tokens, args.hidden, args.accuracy_vocab)
    rows = measure_all(CANDIDATES, shape, accuracy_shape, args.repeats, device)
    print(_caption(shape, accuracy_shape, args.repeats, device_name))
    print()
    print(markdown_table(rows))
    args.out.write_text(json.dumps(report_json(rows, shape, accuracy_shape, args.repeats, device_name), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
