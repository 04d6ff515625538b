"""Check every CUDA path against its reference and measure the framework's speed on one GPU.

    python -m tools.gpu_check [--out gpu_check.json] [--budget-s 450] [--peak-tflops T]

Checks (each a relative error ||got - want|| / ||want||, in fp64, of the output and of every input's
gradient under a random cotangent; the row shows the largest, the JSON each):
- attention: the segment plan (`parallel.segments.segment_attention`; on CUDA one `varlen_attn` call)
  against the dense-mask reference `naive_document_attention` in fp64 on the same inputs. Every rank of a
  head-tail CP group of 2 in one process: packed documents straddling pieces, one starting on a piece
  edge, a one-document row, GQA, with and without a sliding window. CUDA: bf16 and fp32 inputs (the
  kernel computes in bf16 either way), tolerance 2e-2; CPU: fp64, 1e-10.
- Triton cross-entropy (`trainer.kernels.loss_triton`) against `naive_linear_cross_entropy` in fp64, with ignored
  labels and sizes that are not multiples of the blocks. CUDA: bf16 (tolerance 2e-2), and fp32 (1e-4),
  which is what the trainer calls under autocast (the final norm's fp32 output, the fp32 master head);
  CPU: fp32 under the Triton interpreter (TRITON_INTERPRET=1), 1e-4, skipped without triton.
- chunk scan (`trainer.ttt.fastweight.chunk_scan`) against the prefix-sum reference `naive_fastweight` in
  fp64, packed documents: CUDA bf16, tolerance 2e-2; CPU fp32, 1e-4.

Measurements (CUDA only). Every training step is the trainer's own (`trainer.loop.train_step` on the
model `trainer.loop.run` builds for one process: fp32 master weights, bf16 autocast, the Triton loss,
AdamW, gradient clipping), on one random document per step, random init from `conf/model/*.yaml`:
- step time of Qwen3-0.6B at 32k tokens, ttt=ntp against ttt=none (model defaults: every 4th layer,
  C=512): median of 3 steps after 2 warm-up steps; target ntp / none <= 1.10. Activation checkpointing
  is on only when the memory planner says the ntp step needs more than 90% of the GPU (the same setting
  for both), as a user would run it.
- MFU of Qwen3-1.7B, ttt=ntp, at 32k (checkpointing chosen the same way): model FLOPs per step over the
  median step time over the GPU's peak dense bf16 FLOP/s (H100 SXM and H200: 989e12; `--peak-tflops`
  for other GPUs). Model FLOPs of one causal sequence of S tokens, N parameters (the tied head counted
  once, TTT parameters included), L layers of H heads of dimension hd:

      6 N S  +  6 L (H hd) S^2

  (forward 2 and backward 4 FLOPs per parameter and token; attention's QK^T and AV, 4 (H hd) S^2 per
  layer forward without the mask, halved by causality, times 3 with the backward). Not counted: the
  recomputation of activation checkpointing and the fast-weight scan's own FLOPs, so MFU errs low.
  Target >= 35%.
- the longest sequence Qwen3-0.6B with ttt=ntp trains (one full step) with activation checkpointing:
  64k, 128k, 256k, 384k tokens until the first CUDA out-of-memory error, or until the next length's
  predicted time (the last step's, scaled by the squared length ratio) exceeds the time left; target
  >= 256k (on an H200).
- the memory planner (`tools.plan_memory`) against the measured peak (`torch.cuda.max_memory_allocated`
  over the timed steps, above what was allocated before the model was built) of the first run; no
  target, the JSON has it for every run.

Time: checks and measurements keep to `--budget-s` (default 450 s: 8 minutes with start-up). A
measurement starts only with enough time left and takes fewer timed steps when time runs short; a
failing one records its error and the next one runs.

Output: a markdown table (check or measurement, value, target, result, notes) and a JSON file with every
number, the device name and the versions. Without CUDA it runs the CPU checks, says so in one line and
marks the measurements skipped. Exit code 1 when a check or a target fails or a measurement errs, else 0.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from parallel.pieces import fixed_layout
from parallel.segments import layout_plans, naive_document_attention, segment_attention
from parallel.sharding import IGNORE_INDEX, document_starts, next_token_labels, shard
from tools.benchutil import OneLineErrorParser, positive_int, synchronize
from tools.plan_memory import GIB, compose_config, meta_model, model_facts, plan, setup_of
from trainer.config import JobConfig, job_config
from trainer.kernels.loss import naive_linear_cross_entropy
from trainer.loop import Ranks, build_training, setup_ranks, train_step
from trainer.ttt.fastweight import chunk_scan, naive_fastweight
from trainer.ttt.layout import build_layout

REPO = Path(__file__).resolve().parents[1]
NO_GPU_LINE = "no CUDA GPU found: ran the CPU checks only; the measurements need a GPU"
BF16_TOLERANCE = 2e-2  # a bf16 kernel against fp64: its outputs and gradients round to 8 bits
FP32_TOLERANCE = 1e-4
FP64_TOLERANCE = 1e-10
# Peak dense bf16 tensor-core FLOP/s by device name, first match wins (NVIDIA's data sheets).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0))

OVERHEAD_MODEL, MFU_MODEL, SEQ_LEN = "qwen3-0.6b", "qwen3-1.7b", 32768
OVERHEAD_TARGET, MFU_TARGET, LONGEST_TARGET = 1.10, 0.35, 262144
LADDER = (65536, 131072, 262144, 393216)
WARMUP_STEPS, TIMED_STEPS = 2, 3
CHECKPOINT_ABOVE = 0.9  # of the GPU's memory: a planned step above it runs with activation checkpointing
MIN_START_S = 30.0  # a measurement needs at least this much of the budget left to start
MEASUREMENTS = (  # the headline row of each measurement, in the order they run
    "TTT-NTP step-time overhead, Qwen3-0.6B, 32k",
    "memory planner vs measured peak (first run)",
    "MFU, Qwen3-1.7B ntp, 32k",
    "longest sequence, Qwen3-0.6B ntp, activation checkpointing",
)


# --- results ---------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    status: str  # pass | fail | info | skip | error
    value: float | None = None
    shown: str = ""  # the value as the table prints it
    target: str = ""
    notes: str = ""
    data: dict = field(default_factory=dict)  # every number behind the row, for the JSON


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def failed(results: list[Result]) -> bool:
    return any(r.status in ("fail", "error") for r in results)


def markdown_table(results: list[Result]) -> str:
    lines = ["| check / measurement | value | target | result | notes |", "|---|---:|---|---|---|"]
    lines += [f"| {r.name} | {r.shown} | {r.target} | {r.status} | {r.notes} |" for r in results]
    return "\n".join(lines)


# --- checks: each CUDA path against its reference --------------------------------------------------


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp64: one number per tensor, whatever its scale."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def _leaves(*shapes: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int = 0, scale: float = 1.0):
    """Random normal inputs times `scale`, rounded to `dtype`, twice: leaves under test and fp64 leaves of
    the same values for the reference (so the rounding of the inputs is not counted as the kernel's error)."""
    generator = torch.Generator().manual_seed(seed)
    values = [
        (scale * torch.randn(shape, dtype=torch.float64, generator=generator)).to(device, dtype) for shape in shapes
    ]
    return [v.clone().requires_grad_() for v in values], [v.double().requires_grad_() for v in values]


def _errors(got, want, got_inputs, want_inputs, names: tuple[str, ...]) -> dict[str, float]:
    """Relative errors of the outputs and of the inputs' gradients under one random fp64 cotangent."""
    cotangent = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cotangent = cotangent.to(want.device)
    got_grads = torch.autograd.grad((got.double() * cotangent).sum(), got_inputs)
    want_grads = torch.autograd.grad((want * cotangent).sum(), want_inputs)
    errors = {"out": relative_error(got, want)}
    errors.update({f"grad {name}": relative_error(g, w) for name, g, w in zip(names, got_grads, want_grads)})
    return errors


def _packed_positions(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows]).to(device)


# Per device: document lengths per row (the second document of row 0 ends on a piece edge, so the third
# starts on one: head-tail P=2 cuts 48 / 4096 tokens into pieces of 12 / 1024), heads (q, kv), head dim.
ATTENTION_SIZES = {
    "cpu": (((5, 19, 9, 15), (48,)), 4, 2, 8),
    "cuda": (((700, 1348, 1500, 548), (4096,)), 16, 8, 128),
}


def attention_errors(device: torch.device, dtype: torch.dtype, window: int | None) -> dict[str, float]:
    """Every rank of a head-tail CP group of 2, run in one process: the segment plan of its query pieces
    against the gathered keys, against the dense-mask reference on the whole sequence."""
    rows, heads, kv_heads, dim = ATTENTION_SIZES[device.type]
    positions = _packed_positions(rows, device)
    batch, seq = positions.shape
    (q, k, v), reference_inputs = _leaves(
        *[(batch, h, seq, dim) for h in (heads, kv_heads, kv_heads)], dtype=dtype, device=device
    )
    doc_ids = document_starts(positions).long().cumsum(dim=-1)
    want = naive_document_attention(*reference_inputs, 0, doc_ids, dim**-0.5, 0.0, window)

    size, balance = 2, "headtail"
    keys, values = (
        torch.cat([shard(t, r, size, 2, balance) for r in range(size)], dim=2).movedim(2, 0) for t in (k, v)
    )
    plans = layout_plans(positions, fixed_layout(size, balance), window)
    got = [
        segment_attention(shard(q, rank, size, 2, balance), keys, values, plan, dim**-0.5)
        for rank, plan in enumerate(plans)
    ]
    want = torch.cat([shard(want, rank, size, 2, balance).transpose(1, 2) for rank in range(size)], dim=1)
    return _errors(torch.cat(got, dim=1), want, (q, k, v), reference_inputs, ("q", "k", "v"))


# Per device: tokens, hidden size, vocabulary (none a multiple of the blocks), the kernels' block sizes.
LOSS_SIZES = {
    "cpu": (37, 20, 50, dict(block_n=16, block_v=16, block_d=16)),
    "cuda": (4099, 1024, 32003, {}),  # the defaults the trainer runs
}


def triton_loss_errors(device: torch.device, hidden_dtype: torch.dtype, head_dtype: torch.dtype) -> dict[str, float]:
    # late: a machine without CUDA needs TRITON_INTERPRET
    from trainer.kernels.loss_triton import triton_linear_cross_entropy

    tokens, hidden_size, vocab, blocks = LOSS_SIZES[device.type]
    (hidden,), (hidden64,) = _leaves((tokens, hidden_size), dtype=hidden_dtype, device=device)
    scale = hidden_size**-0.5  # logits of order 1, as a trained head gives
    (head,), (head64,) = _leaves((vocab, hidden_size), dtype=head_dtype, device=device, seed=2, scale=scale)
    labels = torch.randint(vocab, (tokens,), generator=torch.Generator().manual_seed(3)).to(device)
    labels[::7] = IGNORE_INDEX
    got = triton_linear_cross_entropy(hidden, head, labels, **blocks)
    want = naive_linear_cross_entropy(hidden64, head64, labels)
    return _errors(got, want, (hidden, head), (hidden64, head64), ("hidden", "head"))


# Per device: document lengths, chunk size, MLP width h, model width d.
SCAN_SIZES = {"cpu": ((7, 12, 13), 4, 16, 8), "cuda": ((1000, 2600, 496), 512, 3072, 1024)}


def chunk_scan_errors(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    lengths, chunk, h, d = SCAN_SIZES[device.type]
    positions = _packed_positions((lengths, lengths[::-1]), device)
    batch, seq = positions.shape
    (z, v), reference_inputs = _leaves((batch, seq, h), (batch, seq, d), dtype=dtype, device=device)
    lr = 1.0 / (chunk * h)  # keeps the raw write's reads of order 1
    got, _ = chunk_scan(z, v, build_layout(positions, chunk, batch_size=batch), lr)
    want = naive_fastweight(*reference_inputs, positions, chunk, lr)
    return _errors(got, want, (z, v), reference_inputs, ("z", "v"))


@dataclass(frozen=True)
class Check:
    name: str
    errors: Callable[[], dict[str, float]]
    tolerance: float
    skip_reason: str | None = None


def device_checks(device: torch.device) -> list[Check]:
    bf16, fp32, fp64 = torch.bfloat16, torch.float32, torch.float64
    attention, loss = partial(attention_errors, device), partial(triton_loss_errors, device)
    scan = partial(chunk_scan_errors, device)
    name = "attention, segment plan vs dense mask"
    no_triton = None if importlib.util.find_spec("triton") else "triton is not installed"
    if device.type == "cuda":
        return [
            Check(f"{name} (varlen), bf16", partial(attention, bf16, None), BF16_TOLERANCE),
            Check(f"{name} (varlen), bf16, window 1000", partial(attention, bf16, 1000), BF16_TOLERANCE),
            Check(f"{name} (varlen), fp32 inputs", partial(attention, fp32, None), BF16_TOLERANCE),
            Check("Triton cross-entropy, bf16 (as trained)", partial(loss, bf16, bf16), BF16_TOLERANCE, no_triton),
            Check("Triton cross-entropy, fp32", partial(loss, fp32, fp32), FP32_TOLERANCE, no_triton),
            Check("chunk scan, bf16 vs fp64", partial(scan, bf16), BF16_TOLERANCE),
        ]
    return [
        Check(f"{name} (SDPA per segment), fp64", partial(attention, fp64, None), FP64_TOLERANCE),
        Check(f"{name} (SDPA per segment), fp64, window 5", partial(attention, fp64, 5), FP64_TOLERANCE),
        Check("Triton cross-entropy, fp32, interpreted", interpreted_triton_loss_errors, FP32_TOLERANCE, no_triton),
        Check("chunk scan, fp32 vs fp64", partial(scan, fp32), FP32_TOLERANCE),
    ]


def interpreted_triton_loss_errors() -> dict[str, float]:
    """The fp32 Triton loss check on CPU under the interpreter, in a child process: TRITON_INTERPRET=1 must be
    set before triton's own kernels are imported, which this process did with torch."""
    code = "import json, torch; from tools.gpu_check import triton_loss_errors as e; "
    code += "print(json.dumps(e(torch.device('cpu'), torch.float32, torch.float32)))"
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    if child.returncode != 0:
        raise RuntimeError(f"the interpreted run failed: {(child.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(child.stdout.splitlines()[-1])


def run_check(check: Check) -> Result:
    target = f"<= {check.tolerance:.0e}"
    if check.skip_reason:
        return Result(check.name, "skip", target=target, notes=check.skip_reason)
    try:
        errors = check.errors()
    except Exception as err:  # a crashing kernel is a failed check; the others still run
        return Result(check.name, "error", target=target, notes=_first_line(err))
    worst = max(errors.values())
    notes = ", ".join(f"{name} {error:.1e}" for name, error in errors.items())
    status = "pass" if worst <= check.tolerance else "fail"
    return Result(
        check.name, status, worst, f"{worst:.2e}", target, notes, {"errors": errors, "tolerance": check.tolerance}
    )


# --- measurements: training steps on the GPU -------------------------------------------------------


@dataclass(frozen=True)
class Deadline:
    end: float  # time.perf_counter() seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def training_job(model: str, ttt: str, seq_len: int, checkpointing: bool) -> JobConfig:
    """The job `ttt-train` would run in one process with these settings, batch 1."""
    overrides = [f"model={model}", f"ttt={ttt}", "parallel=single", f"data.seq_len={seq_len}", "data.batch_size=1"]
    return job_config(compose_config([*overrides, f"train.activation_checkpointing={str(checkpointing).lower()}"]))


def planned_bytes(job: JobConfig) -> int:
    return plan(model_facts(meta_model(job)), setup_of(job, 1, "cuda")).total


def needs_checkpointing(model: str, seq_len: int, device: torch.device) -> bool:
    """Whether the planner puts the ntp step without activation checkpointing above CHECKPOINT_ABOVE of the GPU."""
    budget = CHECKPOINT_ABOVE * torch.cuda.get_device_properties(device).total_memory
    return planned_bytes(training_job(model, "ntp", seq_len, checkpointing=False)) > budget


class _RandomDocument:
    """What `train_step` reads from its loader: one document of random tokens per step. The step's speed
    does not depend on the tokens, and one document per sequence is what the planner assumes."""

    def __init__(self, seq_len: int, vocab: int):
        self.seq_len, self.vocab = seq_len, vocab

    def next_batch(self) -> dict[str, torch.Tensor]:
        tokens = torch.randint(self.vocab, (1, self.seq_len))
        positions = torch.arange(self.seq_len).unsqueeze(0)
        return {"input_ids": tokens, "position_ids": positions, "labels": next_token_labels(tokens, positions)}


def build_training_step(job: JobConfig, ranks: Ranks) -> Callable[[int], None]:
    """One optimizer step of `job` on a random document of a given length, on the model `trainer.loop.run`
    builds (`build_training`: parameters in the master dtype, seeded initialisation, no weights loaded)."""
    training = build_training(job, ranks)
    vocab = training.model.config.vocab_size

    def step(seq_len: int) -> None:
        train_step(training.step_model, training.optimizer, _RandomDocument(seq_len, vocab), job, ranks)

    return step


def _free_cuda_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def timed(step: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    began = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - began


@dataclass(frozen=True)
class Run:
    """One job's timed steps and memory."""

    job: JobConfig
    step_s: list[float]
    peak_bytes: int  # the timed steps' peak above what was allocated before the model was built
    planned_bytes: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def planner_error(self) -> float:
        return (self.planned_bytes - self.peak_bytes) / self.peak_bytes

    @property
    def label(self) -> str:
        return self.job.ttt.method + (", activation checkpointing" if self.job.train.activation_checkpointing else "")

    def summary(self) -> dict:
        job = self.job
        return {
            "model": job.model.name,
            "ttt": job.ttt.method,
            "seq_len": job.data.seq_len,
            "activation_checkpointing": job.train.activation_checkpointing,
            "step_s": self.step_s,
            "median_step_s": self.median_s,
            "peak_bytes": self.peak_bytes,
            "planned_bytes": self.planned_bytes,
            "planner_error": self.planner_error,
        }


def time_training(job: JobConfig, ranks: Ranks, deadline: Deadline) -> Run:
    """TIMED_STEPS steps after WARMUP_STEPS untimed ones (fewer when the deadline nears) and their peak
    memory: the steady state, optimizer states allocated, which is what the planner plans."""
    device = ranks.device
    _free_cuda_memory()  # the previous run's model
    before = torch.cuda.memory_allocated(device)
    step = partial(build_training_step(job, ranks), job.data.seq_len)
    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.reset_peak_memory_stats(device)
    seconds = [timed(step, device)]
    while len(seconds) < TIMED_STEPS and deadline.left() > seconds[-1] + MIN_START_S:
        seconds.append(timed(step, device))
    peak = torch.cuda.max_memory_allocated(device) - before
    return Run(job, seconds, peak, planned_bytes(job))


def _step_time_row(name: str, run: Run) -> Result:
    notes = f"median of {len(run.step_s)}"
    return Result(name, "info", run.median_s, f"{run.median_s:.3f} s", notes=notes, data=run.summary())


def measure_overhead(ranks: Ranks, deadline: Deadline) -> list[Result]:
    """Qwen3-0.6B at 32k, ttt=ntp then ttt=none; the planner against the first (ntp) run."""
    checkpointing = needs_checkpointing(OVERHEAD_MODEL, SEQ_LEN, ranks.device)
    runs = [
        time_training(training_job(OVERHEAD_MODEL, ttt, SEQ_LEN, checkpointing), ranks, deadline)
        for ttt in ("ntp", "none")
    ]
    rows = [_step_time_row(f"step time, Qwen3-0.6B, 32k, {run.label}", run) for run in runs]
    ntp, none = runs
    ratio = ntp.median_s / none.median_s
    status = "pass" if ratio <= OVERHEAD_TARGET else "fail"
    target = f"<= {OVERHEAD_TARGET:.2f}"
    rows.append(
        Result(MEASUREMENTS[0], status, ratio, f"{ratio:.3f}", target, "ntp / none step time", {"ratio": ratio})
    )
    memory = f"planned {ntp.planned_bytes / GIB:.2f} GiB, measured {ntp.peak_bytes / GIB:.2f} GiB ({ntp.label})"
    error = ntp.planner_error
    rows.append(Result(MEASUREMENTS[1], "info", error, f"{100 * error:+.1f}%", notes=memory, data=ntp.summary()))
    return rows


def model_flops(params: int, layers: int, attention_width: int, seq_len: int) -> float:
    """Training FLOPs of one causal sequence (see the module docstring): 6 N S + 6 L (H hd) S^2."""
    return 6 * params * seq_len + 6 * layers * attention_width * seq_len**2


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def measure_mfu(ranks: Ranks, deadline: Deadline, peak: float | None) -> list[Result]:
    if peak is None:
        name = torch.cuda.get_device_name(ranks.device)
        return [Result(MEASUREMENTS[2], "skip", notes=f"peak FLOP/s of {name} unknown: pass --peak-tflops")]
    checkpointing = needs_checkpointing(MFU_MODEL, SEQ_LEN, ranks.device)
    run = time_training(training_job(MFU_MODEL, "ntp", SEQ_LEN, checkpointing), ranks, deadline)
    facts = model_facts(meta_model(run.job))
    flops = model_flops(facts.params, facts.layers, facts.heads * facts.head_dim, SEQ_LEN)
    mfu = flops / run.median_s / peak
    notes = f"{flops / 1e12:.0f} TFLOP per {run.median_s:.3f} s step ({run.label}), peak {peak / 1e12:.0f} TFLOP/s"
    data = {**run.summary(), "model_flops": flops, "peak_flops": peak, "mfu": mfu}
    status = "pass" if mfu >= MFU_TARGET else "fail"
    return [Result(MEASUREMENTS[2], status, mfu, f"{100 * mfu:.1f}%", f">= {100 * MFU_TARGET:.0f}%", notes, data)]


def measure_longest(ranks: Ranks, deadline: Deadline) -> list[Result]:
    """One training step per length of LADDER with activation checkpointing, until the first out-of-memory
    error or until the next length would not finish in the time left."""
    device = ranks.device
    before = torch.cuda.memory_allocated(device)
    step = build_training_step(training_job(OVERHEAD_MODEL, "ntp", LADDER[0], checkpointing=True), ranks)
    rows, longest, stop = [], 0, "every length trained"
    for seq_len in LADDER:
        if longest:
            predicted = rows[-1].value * (seq_len / longest) ** 2  # attention's S^2 dominates at these lengths
            if predicted > deadline.left():
                stop = f"{seq_len} not tried: predicted {predicted:.0f} s, {deadline.left():.0f} s left"
                break
        torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds = timed(partial(step, seq_len), device)
        except torch.cuda.OutOfMemoryError as err:
            stop = f"{seq_len}: out of memory ({_first_line(err)[:120]})"
            break
        peak = torch.cuda.max_memory_allocated(device) - before
        name = f"one step, Qwen3-0.6B ntp, {seq_len} tokens, checkpointing"
        data = {"seq_len": seq_len, "step_s": seconds, "peak_bytes": peak}
        rows.append(Result(name, "info", seconds, f"{seconds:.1f} s", notes=f"peak {peak / GIB:.1f} GiB", data=data))
        longest = seq_len
    del step
    _free_cuda_memory()  # after an out-of-memory error: the failed step's tensors
    status = "pass" if longest >= LONGEST_TARGET else "fail"
    data = {"longest": longest, "stopped": stop, "ladder": list(LADDER)}
    rows.append(Result(MEASUREMENTS[3], status, longest, str(longest), f">= {LONGEST_TARGET}", stop, data))
    return rows


def run_measurement(name: str, measure: Callable[[], list[Result]], deadline: Deadline) -> list[Result]:
    if deadline.left() < MIN_START_S:
        return [Result(name, "skip", notes=f"time budget spent ({deadline.left():.0f} s left)")]
    try:
        rows = measure()
    except Exception as err:  # one failing measurement is a row of the table; the next one still runs
        rows = [Result(name, "error", notes=_first_line(err))]
    _free_cuda_memory()
    return rows


def gpu_measurements(deadline: Deadline, peak_tflops: float | None) -> list[Result]:
    _free_cuda_memory()  # what the checks cached
    ranks = setup_ranks(1)
    peak = peak_flops(torch.cuda.get_device_name(ranks.device), peak_tflops)
    measurements = [
        (MEASUREMENTS[0], partial(measure_overhead, ranks, deadline)),  # its first run gives the planner's row
        (MEASUREMENTS[2], partial(measure_mfu, ranks, deadline, peak)),
        (MEASUREMENTS[3], partial(measure_longest, ranks, deadline)),
    ]
    return [row for name, measure in measurements for row in run_measurement(name, measure, deadline)]


# --- command line ----------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m tools.gpu_check", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON report (default gpu_check.json)")
    parser.add_argument("--budget-s", type=positive_int, default=450, help="seconds for checks and measurements")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of a GPU the tool does not know")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    began = time.perf_counter()
    deadline = Deadline(began + args.budget_s)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    results = [run_check(check) for check in device_checks(device)]
    if cuda:
        results += gpu_measurements(deadline, args.peak_tflops)
    else:
        results += [Result(name, "skip", notes="needs a CUDA GPU") for name in MEASUREMENTS]
    print(markdown_table(results))
    if not cuda:
        print(NO_GPU_LINE)
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "elapsed_s": time.perf_counter() - began,
        "passed": not failed(results),
        "results": [asdict(r) for r in results],
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.out}")
    sys.exit(1 if failed(results) else 0)


if __name__ == "__main__":
    main()
