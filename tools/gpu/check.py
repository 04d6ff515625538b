"""Check every CUDA path against its reference and measure the framework's speed and memory on one GPU.

    ttt-gpu-check [--out gpu_check.json] [--budget-s 450] [--peak-tflops T]

Checks (each a relative error ||got - want|| / ||want||, in fp64, of the output and of every input's
gradient under a random cotangent; the row shows the largest, the JSON each):
- attention: the segment plan (`parallel.segments.segment_attention`; on CUDA one `varlen_attn` call, the K/V
  heads repeated where the torch release's `varlen_attn` has no `enable_gqa`) against the dense-mask reference
  `naive_document_attention` in fp64 on the same inputs. Every rank of a head-tail CP group of 2 in one process:
  packed documents straddling pieces, one starting on a piece edge, a one-document row, GQA, with and without a
  sliding window. CUDA: bf16 and fp32 inputs (the kernel computes in bf16 either way), tolerance 2e-2; CPU: fp64,
  1e-10.
- the loss head as the trainer runs it (`trainer.ops.loss.linear_cross_entropy`: liger-kernel's fused linear
  cross-entropy on CUDA) against `naive_linear_cross_entropy` in fp64, with ignored labels and sizes that are not
  multiples of any block. CUDA: bf16 (tolerance 2e-2) and fp32 (1e-4); CPU: the chunked torch path, fp32.
- the chunk scan (`trainer.ops.fastweight.chunk_scan`: the Triton kernels on CUDA) against the prefix-sum
  reference `naive_fastweight` in fp64, packed documents; and as context parallelism runs it, a sequence cut
  mid-chunk and mid-document, the second piece continuing from the first's (committed, pending) state. CUDA: bf16,
  2e-2; CPU: the torch loop in fp32 and the Triton kernels under the interpreter (TRITON_INTERPRET=1), 1e-4.

Measurements (CUDA only). Every training step is the trainer's own (`trainer.loop.train_step` on the model
`trainer.loop.build_training` builds for one process: fp32 master weights, bf16 autocast, the fused loss, the
Triton scan, AdamW, gradient clipping, `train.compile` and `train.activation_checkpointing` at their defaults,
auto: compiled, and checkpointing only as much as the memory planner says the GPU needs), on one random document
per step, random init from `conf/model/*.yaml`; each run reports its median step time, its peak memory
(`torch.cuda.max_memory_allocated` over the timed steps, above what was allocated before the model was built)
against the planner's (`trainer.planning.memory`, target within ±5%), the step-time model's prediction of it
(`trainer.planning.step_time.predict_step`, this GPU's built-in rates, target within ±15%), and a profile of one more
step (`tools.gpu.step_profile`: top kernels, kernel launches per step):
- step time of Qwen3-0.6B at 32k tokens, ttt=ntp against ttt=none (model defaults: every 4th layer, C=512):
  median of 3 steps after 2 warm-up steps; target ntp / none <= 1.05. The ntp run also measures what autograd
  saves in each decoder layer's forward against the planner's per-layer activations (the largest saved tensors
  of a plain and a TTT layer in the JSON: what the planner is calibrated with).
- the plain transformers step a user would run instead (`tools.bench.hf_baseline`: SDPA, the model's own loss, fused
  AdamW, checkpointing only if the step runs out of memory without it) at the same length; target: the
  framework's ttt=none step <= 0.7x it.
- MFU of Qwen3-1.7B, ttt=ntp, at 32k: model FLOPs per step over the median step time over the GPU's peak dense
  bf16 FLOP/s (H100 SXM and H200: 989e12; `--peak-tflops` for other GPUs). Model FLOPs of one causal sequence of
  S tokens, N parameters (the tied head counted once, TTT parameters included), L layers of H heads of dimension
  hd:

      6 N S  +  6 L (H hd) S^2

  (forward 2 and backward 4 FLOPs per parameter and token; attention's QK^T and AV, 4 (H hd) S^2 per layer
  forward without the mask, halved by causality, times 3 with the backward). Not counted: the recomputation of
  activation checkpointing and the fast-weight scan's own FLOPs, so MFU errs low. Target >= 45%.
- the longest sequence Qwen3-0.6B with ttt=ntp trains (one first step, compilation included, checkpointing auto):
  128k, 256k, 384k, 512k tokens until the first CUDA out-of-memory error, or until the next length's predicted
  time exceeds the time left; target 512k (on an H200).

Time: checks and measurements keep to `--budget-s` (default 450 s: 8 minutes with start-up). A measurement
starts only with enough time left and takes fewer timed steps when time runs short; a failing one records its
error and the next one runs.

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
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from parallel.pieces import fixed_layout
from parallel.segments import layout_plans, naive_document_attention, segment_attention
from parallel.sharding import IGNORE_INDEX, document_starts, next_token_labels, shard
from tools.bench.hf_baseline import time_hf_step
from tools.cli import OneLineErrorParser, positive_int
from tools.gpu.step_profile import profile_step
from tools.measure import synchronize
from trainer.compose import one_process_job
from trainer.config import JobConfig
from trainer.loop import Ranks, Training, build_training, setup_ranks, train_step
from trainer.ops.fastweight import chunk_scan, naive_fastweight
from trainer.ops.fastweight.layout import build_layout
from trainer.ops.loss import linear_cross_entropy, naive_linear_cross_entropy
from trainer.planning.hardware import GPUS, gpu_of_device
from trainer.planning.memory import GIB, Plan, activations_of, meta_model, model_facts, plan, setup_of
from trainer.planning.step_time import builtin_rates, model_flops, predict_step
from trainer.ttt.patch import decoder_of

REPO = Path(__file__).resolve().parents[2]
NO_GPU_LINE = "no CUDA GPU found: ran the CPU checks only; the measurements need a GPU"
BF16_TOLERANCE = 2e-2  # a bf16 kernel against fp64: its outputs and gradients round to 8 bits
FP32_TOLERANCE = 1e-4
FP64_TOLERANCE = 1e-10
# Peak dense bf16 tensor-core FLOP/s by device name, first match wins (NVIDIA's data sheets).

OVERHEAD_MODEL, MFU_MODEL, SEQ_LEN = "qwen3-0.6b", "qwen3-1.7b", 32768
OVERHEAD_TARGET, BASELINE_TARGET, MFU_TARGET, LONGEST_TARGET = 1.05, 0.7, 0.45, 524288
PLANNER_TOLERANCE = 0.05
STEP_MODEL_TOLERANCE = 0.15  # trainer.planning.step_time's prediction of each measured step (issue 25)
LADDER = (131072, 262144, 393216, 524288)
WARMUP_STEPS, TIMED_STEPS = 2, 3
MIN_START_S = 30.0  # a measurement needs at least this much of the budget left to start
MEASUREMENTS = (  # the headline row of each measurement, in the order they run
    "TTT-NTP step-time overhead, Qwen3-0.6B, 32k",
    "framework ttt=none / plain transformers step, Qwen3-0.6B, 32k",
    "MFU, Qwen3-1.7B ntp, 32k",
    "longest sequence, Qwen3-0.6B ntp",
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


# Per device: tokens, hidden size, vocabulary (none a multiple of any block).
LOSS_SIZES = {"cpu": (37, 20, 50), "cuda": (4099, 1024, 32003)}


def loss_errors(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """The loss head as the trainer runs it (`linear_cross_entropy`: liger-kernel's fused linear cross-entropy
    on CUDA) against the full-logits reference in fp64, with ignored labels."""
    tokens, hidden_size, vocab = LOSS_SIZES[device.type]
    (hidden,), (hidden64,) = _leaves((tokens, hidden_size), dtype=dtype, device=device)
    scale = hidden_size**-0.5  # logits of order 1, as a trained head gives
    (head,), (head64,) = _leaves((vocab, hidden_size), dtype=dtype, device=device, seed=2, scale=scale)
    labels = torch.randint(vocab, (tokens,), generator=torch.Generator().manual_seed(3)).to(device)
    labels[::7] = IGNORE_INDEX
    got = linear_cross_entropy(hidden, head, labels)
    want = naive_linear_cross_entropy(hidden64, head64, labels)
    return _errors(got, want, (hidden, head), (hidden64, head64), ("hidden", "head"))


# Per device: document lengths, chunk size, MLP width h, model width d.
SCAN_SIZES = {"cpu": ((7, 12, 13), 4, 16, 8), "cuda": ((1000, 2600, 496), 512, 3072, 1024)}


def chunk_scan_errors(device: torch.device, dtype: torch.dtype, pieces: bool = False) -> dict[str, float]:
    """`chunk_scan` (the Triton kernels on CUDA) on packed documents against the prefix-sum reference. With
    `pieces`, as context parallelism runs it: the sequence cut mid-chunk and mid-document, the second piece
    continuing from the first's (committed, pending) state, gradients flowing back through it."""
    lengths, chunk, h, d = SCAN_SIZES[device.type]
    positions = _packed_positions((lengths, lengths[::-1]), device)
    batch, seq = positions.shape
    (z, v), reference_inputs = _leaves((batch, seq, h), (batch, seq, d), dtype=dtype, device=device)
    lr = 1.0 / (chunk * h)  # keeps the raw write's reads of order 1
    if pieces:
        cut = seq // 2 + chunk // 2 + 1  # inside a chunk of a document that started in the first piece
        first_layout = build_layout(positions[:, :cut], chunk, continues_after=True)
        first, state = chunk_scan(z[:, :cut], v[:, :cut], first_layout, lr)
        second_layout = build_layout(positions[:, cut:], chunk, continues_before=True)
        got = torch.cat([first, chunk_scan(z[:, cut:], v[:, cut:], second_layout, lr, state=state)[0]], dim=1)
    else:
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
    attention, loss = partial(attention_errors, device), partial(loss_errors, device)
    scan = partial(chunk_scan_errors, device)
    name = "attention, segment plan vs dense mask"
    no_triton = None if importlib.util.find_spec("triton") else "triton is not installed"
    if device.type == "cuda":
        return [
            Check(f"{name} (varlen), bf16", partial(attention, bf16, None), BF16_TOLERANCE),
            Check(f"{name} (varlen), bf16, window 1000", partial(attention, bf16, 1000), BF16_TOLERANCE),
            Check(f"{name} (varlen), fp32 inputs", partial(attention, fp32, None), BF16_TOLERANCE),
            Check("fused cross-entropy (liger), bf16 (as trained)", partial(loss, bf16), BF16_TOLERANCE),
            Check("fused cross-entropy (liger), fp32", partial(loss, fp32), FP32_TOLERANCE),
            Check("chunk scan (Triton), bf16 vs fp64", partial(scan, bf16), BF16_TOLERANCE),
            Check("chunk scan (Triton), CP pieces and state, bf16", partial(scan, bf16, True), BF16_TOLERANCE),
        ]
    return [
        Check(f"{name} (SDPA per segment), fp64", partial(attention, fp64, None), FP64_TOLERANCE),
        Check(f"{name} (SDPA per segment), fp64, window 5", partial(attention, fp64, 5), FP64_TOLERANCE),
        Check("cross-entropy (chunked torch), fp32", partial(loss, fp32), FP32_TOLERANCE),
        Check("chunk scan, fp32 vs fp64", partial(scan, fp32), FP32_TOLERANCE),
        Check("chunk scan (Triton), interpreted, fp32", interpreted_scan_errors, FP32_TOLERANCE, no_triton),
    ]


def interpreted_scan_errors() -> dict[str, float]:
    """The scan's Triton kernels on CPU under the interpreter, CP pieces and state included, in a child process:
    TRITON_INTERPRET=1 must be set before triton is imported, which this process did with torch."""
    code = "import json, torch; from tools.gpu.check import chunk_scan_errors as e; cpu = torch.device('cpu'); "
    code += "pieces = {k + ' (pieces)': x for k, x in e(cpu, torch.float32, True).items()}; "
    code += "print(json.dumps({**e(cpu, torch.float32), **pieces}))"
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


def planned(job: JobConfig, checkpoint_every: int | None) -> Plan:
    """The planner's plan of `job` with the activation checkpointing the trainer resolved."""
    setup = replace(setup_of(job, 1, "cuda"), checkpointing=checkpoint_every is not None)
    return plan(model_facts(meta_model(job)), replace(setup, checkpoint_every=checkpoint_every or 1))


class _RandomDocument:
    """What `train_step` reads from its loader: one document of random tokens per step. The step's speed
    does not depend on the tokens, and one document per sequence is what the planner assumes."""

    def __init__(self, seq_len: int, vocab: int):
        self.seq_len, self.vocab = seq_len, vocab

    def next_batch(self) -> dict[str, torch.Tensor]:
        tokens = torch.randint(self.vocab, (1, self.seq_len))
        positions = torch.arange(self.seq_len).unsqueeze(0)
        return {"input_ids": tokens, "position_ids": positions, "labels": next_token_labels(tokens, positions)}


def build_training_step(job: JobConfig, ranks: Ranks) -> tuple[Callable[[int], None], Training]:
    """One optimizer step of `job` on a random document of a given length, on the model `trainer.loop.run`
    builds (`build_training`: parameters in the master dtype, seeded initialisation, no weights loaded,
    activation checkpointing and compilation resolved as the trainer resolves them), and that training."""
    training = build_training(job, ranks)
    vocab = training.model.config.vocab_size

    def step(seq_len: int) -> None:
        train_step(training.step_model, training.optimizer, _RandomDocument(seq_len, vocab), job, ranks)

    return step, training


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
    checkpoint_every: int | None  # the activation checkpointing the run resolved
    step_s: list[float]
    peak_bytes: int  # the timed steps' peak above what was allocated before the model was built
    plan: Plan
    profile: dict | None = None  # `tools.gpu.step_profile` of one more step
    saved_per_layer: dict | None = None  # what autograd saved in each decoder layer's forward, measured

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def planner_error(self) -> float:
        return (self.plan.total - self.peak_bytes) / self.peak_bytes

    @property
    def label(self) -> str:
        every = self.checkpoint_every
        checkpointing = "" if every is None else f", checkpointing {'every layer' if every == 1 else f'every {every}'}"
        compiled = ", compiled" if self.job.train.compiles("cuda") else ""
        return f"{self.job.model.name} {self.job.ttt.method}, {self.job.data.seq_len // 1024}k{checkpointing}{compiled}"

    def summary(self) -> dict:
        job = self.job
        return {
            "model": job.model.name, "ttt": job.ttt.method, "seq_len": job.data.seq_len,
            "checkpoint_every": self.checkpoint_every, "compiled": job.train.compiles("cuda"),
            "step_s": self.step_s, "median_step_s": self.median_s, "peak_bytes": self.peak_bytes,
            "planned_bytes": self.plan.total, "planned_rows": self.plan.rows, "planned_peak_at": self.plan.peak,
            "planner_error": self.planner_error, "profile": self.profile, "saved_per_layer": self.saved_per_layer,
        }  # fmt: skip


def saved_per_layer(training: Training, job: JobConfig, ranks: Ranks) -> dict:
    """Bytes autograd saves in each decoder layer's forward (unique storages; parameters and the autocast copies
    of the weights, which the planner counts with the parameters, left out), beside the planner's per-layer
    activations, with the largest saved tensors of the first plain and first TTT layer: what the planner is
    calibrated against. One forward, no backward, on a warmed-up (compiled) model."""
    model = training.model
    layers = decoder_of(model).layers
    weight_shapes = {tuple(p.shape) for p in model.parameters()}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current, seen = [None], {}
    tensors = [dict() for _ in layers]

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        layer = current[0]
        if layer is not None and ptr not in params and ptr not in seen and tuple(tensor.shape) not in weight_shapes:
            seen[ptr] = layer
            key = f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
            count, nbytes = tensors[layer].get(key, (0, 0))
            tensors[layer][key] = (count + 1, nbytes + tensor.untyped_storage().nbytes())
        return tensor

    hooks = [
        layer.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__(0, i)) for i, layer in enumerate(layers)
    ]
    batch = _RandomDocument(job.data.seq_len, model.config.vocab_size).next_batch()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ranks.device.type == "cuda"):
                training.step_model(*(batch[k].to(ranks.device) for k in ("input_ids", "position_ids", "labels")))
    finally:
        for hook in hooks:
            hook.remove()
    measured = [sum(nbytes for _, nbytes in layer.values()) for layer in tensors]
    facts = model_facts(meta_model(job))
    acts = activations_of(facts, setup_of(job, 1, "cuda"))
    per_layer = [acts.attention.saved + acts.mlp + (acts.ttt_extra if i in facts.ttt_layer_indices else 0)
                 for i in range(len(layers))]  # fmt: skip
    ttt = facts.ttt_layer_indices
    plain = [i for i in range(len(layers)) if i not in ttt]

    def largest(i: int) -> list:
        return sorted(((key, *v) for key, v in tensors[i].items()), key=lambda row: -row[2])[:40]

    return {
        "measured": measured, "planned": per_layer,
        "plain_layer": {"index": plain[0], "tensors": largest(plain[0])} if plain else None,
        "ttt_layer": {"index": ttt[0], "tensors": largest(ttt[0])} if ttt else None,
    }  # fmt: skip


def time_training(job: JobConfig, ranks: Ranks, deadline: Deadline, probe_memory: bool = False) -> Run:
    """TIMED_STEPS steps after WARMUP_STEPS untimed ones (fewer when the deadline nears), their peak memory
    (the steady state, optimizer states allocated, which is what the planner plans), then one profiled step
    and, with `probe_memory`, the saved activations per layer."""
    device = ranks.device
    _free_cuda_memory()  # the previous run's model
    before = torch.cuda.memory_allocated(device)
    step, training = build_training_step(job, ranks)
    step = partial(step, job.data.seq_len)
    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.reset_peak_memory_stats(device)
    seconds = [timed(step, device)]
    while len(seconds) < TIMED_STEPS and deadline.left() > seconds[-1] + MIN_START_S:
        seconds.append(timed(step, device))
    peak = torch.cuda.max_memory_allocated(device) - before
    profile = _unless_it_fails(profile_step, step) if deadline.left() > 3 * seconds[-1] + MIN_START_S else None
    saved = _unless_it_fails(saved_per_layer, training, job, ranks) if probe_memory else None
    return Run(job, training.checkpoint_every, seconds, peak, planned(job, training.checkpoint_every), profile, saved)


def _unless_it_fails(function: Callable[..., dict], *args) -> dict:
    """A diagnostic's result, or its error: a failing profile must not cost the run's timings."""
    try:
        return function(*args)
    except Exception as err:
        return {"error": _first_line(err)}


def _run_rows(run: Run) -> list[Result]:
    """The run's step time and the planner against its peak."""
    notes = f"median of {len(run.step_s)}"
    if run.profile is not None and "launches" in run.profile:
        notes += f"; {run.profile['launches']} kernel launches per step"
    memory = f"planned {run.plan.total / GIB:.2f} GiB, measured {run.peak_bytes / GIB:.2f} GiB"
    error = run.planner_error
    status = "pass" if abs(error) <= PLANNER_TOLERANCE else "fail"
    return [
        Result(f"step time, {run.label}", "info", run.median_s, f"{run.median_s:.3f} s", notes=notes,
               data=run.summary()),
        Result(f"planner vs measured peak, {run.label}", status, error, f"{100 * error:+.1f}%",
               f"within ±{100 * PLANNER_TOLERANCE:.0f}%", memory, {"planned": run.plan.total, "peak": run.peak_bytes}),
        _predicted_row(f"step-time model vs measured, {run.label}", run.job, run.checkpoint_every, run.median_s),
    ]  # fmt: skip


def _predicted_row(name: str, job: JobConfig, checkpoint_every: int | None, seconds: float) -> Result:
    """trainer.planning.step_time's prediction of a measured step (the built-in rates of this GPU kind) beside it."""
    prediction = predict_step(job, checkpoint_every, builtin_rates(_gpu_kind()))
    error = (prediction.step_s - seconds) / seconds
    status = "pass" if abs(error) <= STEP_MODEL_TOLERANCE else "fail"
    parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(prediction.parts.items(), key=lambda kv: -kv[1]) if v)
    notes = f"predicted {prediction.step_s:.3f} s, measured {seconds:.3f} s; predicted parts (s): {parts}"
    data = {"predicted_s": prediction.step_s, "measured_s": seconds, "parts": prediction.parts}
    target = f"within ±{100 * STEP_MODEL_TOLERANCE:.0f}%"
    return Result(name, status, error, f"{100 * error:+.1f}%", target, notes, data)


def measure_overhead(ranks: Ranks, deadline: Deadline) -> list[Result]:
    """Qwen3-0.6B at 32k, ttt=ntp then ttt=none (activation checkpointing and compilation auto, the same for
    both as a user would run them); the planner against each; the per-layer activations of the ntp run."""
    ntp = time_training(one_process_job(OVERHEAD_MODEL, "ntp", SEQ_LEN), ranks, deadline, probe_memory=True)
    none = time_training(one_process_job(OVERHEAD_MODEL, "none", SEQ_LEN), ranks, deadline)
    ratio = ntp.median_s / none.median_s
    status = "pass" if ratio <= OVERHEAD_TARGET else "fail"
    target = f"<= {OVERHEAD_TARGET:.2f}"
    saved = ntp.saved_per_layer
    layer_notes = saved.get("error") or ", ".join(
        f"{kind} layer {saved[kind]['index']}: measured {saved['measured'][saved[kind]['index']] / GIB:.2f} GiB, "
        f"planned {saved['planned'][saved[kind]['index']] / GIB:.2f}"
        for kind in ("plain_layer", "ttt_layer") if saved[kind]
    )  # fmt: skip
    return [
        *_run_rows(ntp),
        *_run_rows(none),
        Result(MEASUREMENTS[0], status, ratio, f"{ratio:.3f}", target, "ntp / none step time", {"ratio": ratio}),
        Result("saved activations per decoder layer, ntp run", "info", notes=layer_notes, data=saved),
    ]


def measure_baseline(ranks: Ranks, deadline: Deadline, framework_none_s: float | None) -> list[Result]:
    """The plain transformers step a user would run (`tools.bench.hf_baseline`), checkpointing only where it must,
    against the framework's ttt=none step at the same length."""
    _free_cuda_memory()
    timing = time_hf_step(OVERHEAD_MODEL, SEQ_LEN, ranks.device, steps=TIMED_STEPS, warmup=WARMUP_STEPS)
    _free_cuda_memory()
    rows = [Result(f"plain transformers step, {OVERHEAD_MODEL}, 32k", "info", timing.median_s,
                   f"{timing.median_s:.3f} s" if timing.median_s else "-",
                   notes=("checkpointing" if timing.checkpointing else "no checkpointing")
                   + (f" (without: {timing.without_checkpointing.error[:80]})" if timing.without_checkpointing else ""),
                   data=timing.summary())]  # fmt: skip
    if framework_none_s is None or timing.median_s is None:
        return rows + [Result(MEASUREMENTS[1], "skip", notes="a step time is missing")]
    ratio = framework_none_s / timing.median_s
    status = "pass" if ratio <= BASELINE_TARGET else "fail"
    notes = f"framework ttt=none {framework_none_s:.3f} s / plain transformers {timing.median_s:.3f} s"
    data = {"ratio": ratio, "framework_s": framework_none_s, "plain_s": timing.median_s}
    return rows + [Result(MEASUREMENTS[1], status, ratio, f"{ratio:.3f}", f"<= {BASELINE_TARGET:.2f}", notes, data)]


def _gpu_kind() -> str:
    """This GPU's kind for the step-time model's built-in rates (an H100's when the table lacks it)."""
    return gpu_of_device(torch.cuda.get_device_name()) or "h100"


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    kind = gpu_of_device(device_name)
    return GPUS[kind].peak_flops if kind else None


def measure_mfu(ranks: Ranks, deadline: Deadline, peak: float | None) -> list[Result]:
    if peak is None:
        name = torch.cuda.get_device_name(ranks.device)
        return [Result(MEASUREMENTS[2], "skip", notes=f"peak FLOP/s of {name} unknown: pass --peak-tflops")]
    run = time_training(one_process_job(MFU_MODEL, "ntp", SEQ_LEN), ranks, deadline)
    facts = model_facts(meta_model(run.job))
    flops = model_flops(facts.params, facts.layers, facts.heads * facts.head_dim, SEQ_LEN)
    mfu = flops / run.median_s / peak
    notes = f"{flops / 1e12:.0f} TFLOP per {run.median_s:.3f} s step ({run.label}), peak {peak / 1e12:.0f} TFLOP/s"
    data = {**run.summary(), "model_flops": flops, "peak_flops": peak, "mfu": mfu}
    status = "pass" if mfu >= MFU_TARGET else "fail"
    return [
        *_run_rows(run),
        Result(MEASUREMENTS[2], status, mfu, f"{100 * mfu:.1f}%", f">= {100 * MFU_TARGET:.0f}%", notes, data),
    ]


def measure_longest(ranks: Ranks, deadline: Deadline) -> list[Result]:
    """One training step per length of LADDER, activation checkpointing and compilation auto, until the first
    out-of-memory error or until the next length would not finish in the time left."""
    device = ranks.device
    rows, longest, stop = [], 0, "every length trained"
    for seq_len in LADDER:
        if longest:
            predicted = 1.5 * rows[-1].value * (seq_len / longest) ** 2  # attention's S^2; a compile on first use
            if predicted > deadline.left():
                stop = f"{seq_len} not tried: predicted {predicted:.0f} s, {deadline.left():.0f} s left"
                break
        _free_cuda_memory()
        before = torch.cuda.memory_allocated(device)
        job = one_process_job(OVERHEAD_MODEL, "ntp", seq_len)
        try:
            step, training = build_training_step(job, ranks)
            every = training.checkpoint_every
            del training  # the step holds what it needs; the rest goes with it
            torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(partial(step, seq_len), device)
        except torch.cuda.OutOfMemoryError as err:
            stop = f"{seq_len}: out of memory ({_first_line(err)[:120]})"
            break
        finally:
            step = None
        peak = torch.cuda.max_memory_allocated(device) - before
        plan_bytes = planned(job, every).total
        name = f"first step (compilation included), Qwen3-0.6B ntp, {seq_len} tokens, checkpointing every {every}"
        notes = f"peak {peak / GIB:.1f} GiB, planned {plan_bytes / GIB:.1f} ({100 * (plan_bytes - peak) / peak:+.1f}%)"
        data = {"seq_len": seq_len, "step_s": seconds, "peak_bytes": peak, "planned_bytes": plan_bytes}
        predicted = predict_step(job, every, builtin_rates(_gpu_kind()))
        notes += f"; step-time model {predicted.step_s:.1f} s (a steady step)"
        data["predicted_s"] = predicted.step_s
        rows.append(Result(name, "info", seconds, f"{seconds:.1f} s", notes=notes, data=data))
        longest = seq_len
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
    rows = run_measurement(MEASUREMENTS[0], partial(measure_overhead, ranks, deadline), deadline)
    none_s = next((r.value for r in rows if r.name.startswith("step time") and r.data.get("ttt") == "none"), None)
    measurements = [
        (MEASUREMENTS[1], partial(measure_baseline, ranks, deadline, none_s)),
        (MEASUREMENTS[2], partial(measure_mfu, ranks, deadline, peak)),
        (MEASUREMENTS[3], partial(measure_longest, ranks, deadline)),
    ]
    return rows + [row for name, measure in measurements for row in run_measurement(name, measure, deadline)]


# --- command line ----------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="ttt-gpu-check", description=__doc__.split("\n", 1)[0])
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
