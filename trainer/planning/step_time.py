"""Time of one training step on 1-64 GPUs, planned from the trainer's own Hydra config (the memory planner's inputs);
its command line is `ttt-plan time` (tools/commands/plan.py).

    ttt-plan time model=qwen3-8b data.seq_len=131072 parallel.cp=8 --gpus 64 --gpu h200
    ttt-plan time model=qwen3-8b data.seq_len=131072 --gpus 64 --fastest   # the fastest CP x DP split
    ttt-plan time ... --rates gpu_check.json                               # rates a GPU measured

A run is described exactly as for the memory plan (`ttt-plan` reads one set of flags for both: Hydra overrides,
`--gpus`, `--gpu`, `--gpu-memory-gb`, `--gpus-per-node`, `--device`; `train.activation_checkpointing=auto`
resolved as the trainer resolves it) and read into the same `ModelFacts` and `Setup`. `predict` says where one
optimizer step's time goes and the bytes each collective moves; `candidate_splits` / `fastest_split` try every CP
degree that divides the GPUs, keep those whose memory plan (`trainer.planning.memory.plan`, checkpointing auto)
fits 90% of the memory, the margin auto keeps, and rank them by tokens/s per GPU (the global batch is DP sequences
of S tokens per micro-batch, so it differs between splits).

Notation as in the memory plan: N GPUs, CP degree P (DP = N / P), b sequences of S tokens per data-parallel rank and
micro-batch, k micro-batches per step (`train.grad_accum`), s = b S / P tokens per GPU and micro-batch, L layers,
T TTT layers, R the layers activation checkpointing recomputes, d, h, V the model, MLP and vocabulary widths,
H x hd query and KV x hd key/value heads, a activation bytes, c = max(a, 4) the fast-weight states' bytes.

Compute (per GPU, per micro-batch; seconds = work / the rate of its kernel class, `Rates`):
- dense matmuls: 2 s W FLOPs forward, 4 s W backward, with W the weights of a layer's projections (q, k, v, o,
  gate, up, down; a TTT layer's d x d target projection and write gate too); again 2 s W for each layer of R.
- attention: 4 H hd x (query-key pairs the rank attends) forward, 2.5 times that backward (flash's backward
  recomputes QK^T: 5 products to the forward's 2); again forward for R. The pairs come from the rank's segment
  plan (`parallel.segments`, one document per sequence), the most loaded rank: S (S+1) / 2 / P for head-tail,
  more for contiguous shards. Ulysses: all pairs for H/P heads.
- the loss head: 6 s d V (liger computes both gradients in its forward).
- the fast-weight scan, per TTT layer: 7 products of 2 s d h (forward: read and write; backward: the states
  recomputed, the read's gradient, the reverse walk's two products and the state gradient), + 2 for a layer of R;
  under CP + 3 for reading the incoming state, and + 3 for the state transfer when `parallel.overlap_state_scan`
  computes it ahead of the local scan.
- elementwise kernels, in bytes moved: per token and layer, what each op outside the matmuls reads and writes
  (`_elementwise_bytes`: norms, casts, RoPE, residual adds, SiLU x up, the TTT layer's keys, gates, targets and
  read), eager (every op its own kernel, as torch runs it uncompiled) or compiled (`train.compile`: each fused
  region reads its inputs and writes its outputs once); the backward moves twice the forward's bytes, R's
  recomputation the forward's again. Per parameter: the optimizer (AdamW on fp32 masters: 32 bytes per local
  parameter with the gradient norm), autocast's weight casts without a sharding engine (4 + a bytes per use).
Not modelled: kernel launch gaps and the host (a step of 1,400 eager kernels loses ~5 ms), the first step's
compilation and allocations, `train.trainable` other than all (the frozen base's weight gradients are computed
anyway here), sliding windows.

Communication (`transfers`: per rank and step, from the code that sends; `bytes_sent` sums them by purpose,
and tests/test_plan_time.py checks every purpose against what a real run on gloo sends, byte for byte). A ring
all-gather or reduce-scatter over g ranks sends (g - 1) x its shard per rank, an all-reduce 2 (g - 1) / g of
the tensor; CP groups are adjacent ranks (the mesh is DP x CP), engines span all N ranks:
- attention (all-gather CP): per layer and forward (R: again in the recomputation) K and V all-gathered, each
  (P - 1) b (S/P) KV hd a; their gradients reduce-scattered in the backward. Ulysses: all-to-alls of q, k, v
  and the output forward, mirrored backward. positions: the global position ids all-gathered once per forward
  (int64).
- fastweight_scan: per TTT layer and scan (forward, R's recomputation, the adjoint in the backward) ceil(log2 n)
  rounds over the n = P x pieces-per-rank pieces; a round sends each local piece's (flag, committed, pending)
  = b (1 + 2 d h) c bytes to the piece 2^k away when another rank holds it; the normalized write's gate mass
  the same with d = h = 1.
- halo: per TTT layer and forward the target rows of the neighbouring pieces held elsewhere (NTP: one row
  after, inplace: k//2 before and after; b d a bytes per row), their gradients back in the backward; once per
  forward the int64 position rows of the same halo.
- parameters / gradients (FSDP2): each unit (the root: embeddings, final norm, head; each decoder layer)
  all-gathers its shards (dim 0 of every parameter cut in N, padded; bf16 on CUDA) in the forward and, but the
  root, again in the backward; gradients reduce-scatter once per step in fp32. DeepSpeed ZeRO-2: gradients
  all-reduced per micro-batch (its default multi-rank buckets), the updated bf16 partitions of each parameter
  group (padded to 2N) all-gathered after the step. ZeRO-3: each parameter's partition (ceil(n / N)) all-gathered
  in the forward and again in the backward when the model exceeds its reuse distance (1e9 parameters);
  parameters of at most 1e5 elements are persistent, gathered once after the step; gradients reduce-scattered per
  micro-batch. ddp: one flat all-reduce of the gradients.
Not counted: scalar all-reduces (token counts, loss, gradient norm) and DeepSpeed's bookkeeping broadcasts.

What overlaps what (the code's, not an ideal's):
- Compute kernels run one after another on one stream.
- CP's K/V all-gather, its reduce-scatter, the halo and the positions are synchronous: exposed.
- The state scan is exposed, or with `parallel.overlap_state_scan` runs beside the layer's local chunk scan:
  exposed only by what exceeds that scan's time.
- FSDP2 and ZeRO-3 prefetch: a layer's parameter all-gather (and in the backward the previous layer's gradient
  reduce-scatter) runs beside the layer's compute, sharing the links with CP's collectives: a layer takes
  CP's exposed time + max(compute, engine traffic); the root's gather and the last reduce-scatter are exposed.
- ZeRO-2's gradient all-reduce (overlap_comm off by default), its parameter all-gather after the step, ZeRO-3's
  persistent gathers and ddp's all-reduce: exposed.
Collective time: bytes / bus bandwidth + latency per ring step or message (`hardware.Links`: NVLink inside
a node, the network cards across nodes).

Rates (`Rates`; `ttt-plan time --rates gpu_check.json` replaces the built-in ones by what `ttt-gpu-check` measured, see
`rates_from_gpu_check`). Built in for H200, from one H200 (docs/gpu.md): attention 665 / 570 TFLOP/s forward /
backward (cuDNN flash at 32k), the loss head 419 TFLOP/s (liger, 73 ms for 32768 x 1024 x 151936). Assumed where
nothing was measured, and labelled so: dense matmuls, elementwise bytes/s (fitted to the last GPU table's
ttt=none step, see docs/planner.md), the Triton scan. H100: the same compute rates (the same SMs and clocks),
elementwise scaled by HBM bandwidth. MFU: `model_flops` (6 N S + 6 L H hd S^2 per sequence, no
recomputation, no scan) over the data-sheet peak (989 TFLOP/s).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from parallel.mesh import check_cp
from parallel.pieces import batch_layout, pieces_per_rank
from parallel.state_scan import scan_rounds
from trainer.compose import one_process_job
from trainer.config import JobConfig
from trainer.planning.hardware import GPUS, Links, gpu_of_device
from trainer.planning.memory import (
    AUTO_BUDGET,
    FP32,
    SHARDED,
    ModelFacts,
    Setup,
    _rank_plans,
    cheapest_checkpointing,
    checkpointed_layers,
    meta_model,
    model_facts,
    plan,
    setup_of,
)

INDEX_BYTES = 8  # int64 position ids
BACKWARD_ELEMENTWISE = 2  # an elementwise op's backward reads its saved inputs and the gradient, writes gradients
FLASH_BACKWARD = 2.5  # flash attention's backward: 5 products (QK^T again) to the forward's 2
SCAN_PRODUCTS = 7  # the chunk scan forward + backward, in products of 2 s d h FLOPs (docs/gpu.md)
SCAN_RECOMPUTE_PRODUCTS = 2  # a checkpointed layer's forward walk again
CP_READ_PRODUCTS = 3  # Z C_in^T forward, its two gradients
TRANSFER_PRODUCTS = 3  # overlap_state_scan: the pieces' transfers V^T Z ahead of the scan, and their gradients
ADAM_BYTES = 32  # per fp32 master parameter: read p, g, m, v, write p, m, v; the gradient norm reads g
DEEPSPEED_COPY_BYTES = 12  # bf16 gradients to the fp32 partition, the updated fp32 partition back to bf16
ZERO3_PERSISTENCE = 100_000  # DeepSpeed's stage3_param_persistence_threshold (elements)
ZERO3_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance (elements)
DEEPSPEED_BUCKET = 500_000_000  # reduce_bucket_size (elements)
DEEPSPEED_ALIGNMENT = 2  # nccl_start_alignment_factor: a group's flat buffer is padded to 2 N elements
PURPOSES = ("attention", "positions", "fastweight_scan", "halo", "parameters", "gradients")
DEFAULT_GPU = "h200"  # the GPU whose rates were measured
CLASSES = ("attention", "matmuls", "loss head", "fast-weight scan", "elementwise")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class PlanTimeError(ValueError):
    """A one-line error about the time model's own inputs (a rates file, a GPU)."""


# --- rates -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """What each kernel class reaches on one GPU: FLOP/s, and bytes/s for elementwise kernels."""

    gpu: str
    peak: float  # dense bf16 FLOP/s, the data sheet's: the MFU denominator
    attention_forward: float
    attention_backward: float
    matmul: float
    loss: float  # the loss head, forward and backward together (6 s d V FLOPs)
    scan: float  # the fast-weight chunk scan
    memory: float  # elementwise kernels, bytes moved per second
    scan_step_s: float = 0.0  # per TTT layer, chunk and pass over the chunks (a scan looping on the host); 0: kernels
    sources: tuple[tuple[str, str], ...] = ()  # (rate, where its number comes from)

    def source(self, rate: str) -> str:
        return dict(self.sources).get(rate, "")


_LIGER_S = 0.073  # docs/gpu.md: liger's loss head, fwd + bwd, 32768 tokens x d 1024 x vocab 151936, one H200
_LOSS_SHAPE = (32768, 1024, 151936)
# Fitted to the last GPU table (docs/planner.md, "The compute side against the H200"): the eager ttt=none step of
# Qwen3-0.6B at 32k with every other rate measured or assumed as below.
_EAGER_MEMORY_FIT = 1.96e12
_MATMUL_FRACTION = 0.7  # assumed: what cuBLAS reaches of the data sheet's dense bf16 peak on these GEMMs
_TRITON_SCAN_FRACTION = 0.3  # assumed: the Triton scan (fp32 atomics, spills) against the dense peak; unmeasured


def _loss_rate(seconds: float) -> float:
    tokens, hidden, vocab = _LOSS_SHAPE
    return 6 * tokens * hidden * vocab / seconds


def builtin_rates(gpu: str) -> Rates:
    """The built-in rates of a GPU of the table (see the module docstring): measured on an H200, scaled to another
    GPU by its dense peak (attention) or its HBM bandwidth (elementwise)."""
    if gpu not in GPUS:
        raise PlanTimeError(f"no built-in rates for GPU {gpu!r}; known: {', '.join(sorted(GPUS))}")
    spec, h200 = GPUS[gpu], GPUS["h200"]
    hbm = spec.hbm_bytes_per_s / h200.hbm_bytes_per_s  # elementwise kernels are bound by HBM
    peak = spec.peak_flops / h200.peak_flops  # 1 on the SXM parts: the same SMs and clocks
    measured = "measured on one H200 (docs/gpu.md)" + ("" if gpu == "h200" else ", x the dense peak's ratio")
    return Rates(
        gpu=gpu,
        peak=spec.peak_flops,
        attention_forward=665e12 * peak,
        attention_backward=570e12 * peak,
        matmul=_MATMUL_FRACTION * spec.peak_flops,
        loss=_loss_rate(_LIGER_S),
        scan=_TRITON_SCAN_FRACTION * spec.peak_flops,
        memory=_EAGER_MEMORY_FIT * hbm,
        sources=(
            ("attention_forward", f"cuDNN flash at 32k, {measured}"),
            ("attention_backward", f"cuDNN flash at 32k, {measured}"),
            ("matmul", f"assumed: {_MATMUL_FRACTION:.0%} of the data sheet's {spec.peak_flops / 1e12:.0f} TFLOP/s"),
            ("loss", f"liger fused linear cross-entropy, {measured}"),
            ("scan", f"assumed: {_TRITON_SCAN_FRACTION:.0%} of the data sheet's peak (Triton scan not yet timed)"),
            ("memory", "fitted to the H200's eager ttt=none step" + ("" if gpu == "h200" else ", x HBM ratio")),
        ),
    )


# The kernels of the step the last GPU table measured (main at 41c0d84: the torch-loop scan, the project's own
# Triton loss head, no compilation), from that run's profile (docs/gpu.md).
_OLD_LOSS_S = 0.261  # its loss head at 32768 x 1024 x 151936, forward + backward
_OLD_SCAN_S = 0.480  # 214 ms of baddbmm + 266 ms of fp32 SIMT GEMMs for the 7 TTT layers of Qwen3-0.6B at 32k
_FP32_SIMT = 0.8 * 67e12  # assumed: the torch loop's fp32 GEMMs (no TF32) at 80% of the data sheet's fp32 rate


def rates_at_41c0d84() -> Rates:
    """The H200 rates of the kernels the last GPU table ran (no compilation: predict it with `compiled=False`). Its
    torch-loop scan ran fp32 GEMMs chunk by chunk, launched from Python: its time is the products at the fp32 rate
    plus a cost per chunk and pass, which is what remains of the profile's 480 ms for Qwen3-0.6B at 32k (7 layers,
    64 chunks, 3 passes)."""
    base = builtin_rates("h200")
    scan_flops = SCAN_PRODUCTS * 2 * 32768 * 1024 * 3072 * 7
    step_s = (_OLD_SCAN_S - scan_flops / _FP32_SIMT) / (7 * 64 * 3)
    sources = dict(base.sources)
    sources["loss"] = "the project's former Triton loss head: 261 ms at 32768 x 1024 x 151936 (docs/gpu.md)"
    sources["scan"] = "the torch loop's fp32 GEMMs: assumed 80% of the data sheet's 67 TFLOP/s fp32"
    sources["scan_step_s"] = "the rest of that step's profiled 480 ms of scan (docs/gpu.md), per layer, chunk, pass"
    return replace(
        base, gpu="h200@41c0d84", loss=_loss_rate(_OLD_LOSS_S), scan=_FP32_SIMT, scan_step_s=step_s,
        sources=tuple(sources.items()),
    )  # fmt: skip


# --- work: what one step computes on one GPU ---------------------------------------------------------------


@dataclass(frozen=True)
class LayerWork:
    """One decoder layer, per micro-batch: FLOPs per class, elementwise bytes, forward and backward apart (the
    backward's include the recomputation of a checkpointed layer)."""

    matmul: tuple[float, float]
    attention: tuple[float, float]
    scan: tuple[float, float]
    memory: tuple[float, float]
    scan_passes: tuple[int, int] = (0, 0)  # chunk steps of the scan's passes (forward walk; walk and reverse walk)
    recomputed: bool = False  # the backward's work includes the forward's again (its attention at the forward's rate)


def _layer_weights(m: ModelFacts, st: Setup, ttt: bool) -> int:
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    weights = 2 * m.hidden * q + 2 * m.hidden * kv + 3 * m.hidden * m.intermediate
    if ttt:
        weights += (m.hidden**2 if st.ttt.proj else 0) + (m.hidden if st.ttt.write == "normalized" else 0)
    return weights


def attended_pairs(m: ModelFacts, st: Setup) -> int:
    """Query-key pairs the most loaded rank attends per layer and micro-batch (one document per sequence)."""
    if st.cp > 1 and st.attention == "ulysses":  # every pair, for H/P of the heads
        return st.batch * st.seq_len * (st.seq_len + 1) // 2 // st.cp
    return st.batch * _most_pairs(st.seq_len, st.cp, st.load_balance)


@lru_cache(maxsize=256)
def _most_pairs(seq_len: int, cp: int, load_balance: str) -> int:
    return max(p.attended_pairs for p in _rank_plans(seq_len, cp, load_balance))


def _norm_bytes(width: int, dtype: int) -> int:
    """An eager RMSNorm on a `dtype`-byte input: to fp32, pow, mean, x * rsqrt, back, weight * x."""
    cast = (dtype + FP32) * width if dtype != FP32 else 0
    return 2 * cast + (2 * FP32 + FP32 + 2 * FP32) * width + 2 * dtype * width


def _elementwise_bytes(m: ModelFacts, st: Setup, ttt: bool) -> int:
    """Bytes the elementwise ops of one layer's forward move per token (see the module docstring)."""
    a, d, h = st.act_bytes, m.hidden, m.intermediate
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    r = FP32 if st.fp32_residual else a  # the residual stream
    cast = (r + a) if r != a else 0  # autocast's copy of an fp32 norm output per linear layer reading it
    if st.compiled:  # one fused kernel per region between matmuls: its inputs read once, its outputs written once
        total = (r + a) * d  # input norm
        total += 2 * a * (q + kv) if m.qk_norm else 0  # query/key norms fused with the rotation
        total += 2 * a * (q + kv) + 2 * a * q  # rotation; the attention output back to token-major
        total += (2 * r + a) * d + a * d  # residual add fused with the post-attention norm
        total += 3 * a * h + (2 * r + a) * d  # SiLU x up; the last residual add
        if ttt:  # unit keys, gates, targets, the gated values; after the scan the gated mean and the sum
            total += 2 * a * h + 4 * a * d + 4 * a * d
    else:
        total = 2 * _norm_bytes(d, r) + 5 * cast * d  # two norms; q, k, v and gate, up read casts
        total += (_norm_bytes(q, a) + _norm_bytes(kv, a)) if m.qk_norm else 0
        total += 10 * a * (q + kv) + 2 * a * q  # RoPE (two products, rotate_half's cat and neg, a sum); transpose
        total += 2 * (2 * r + a) * d + 5 * a * h  # two residual adds; SiLU, x up
        if ttt:  # keys = Z/|Z|; the gate's cast; the source's cast, shift and mask; g V; the gated mean; out + fast
            total += 4 * a * h + cast * d + (r + a) * d + 4 * a * d + 2 * a * d + 4 * a * d + 3 * a * d
    if st.cp > 1 and st.attention == "allgather":  # K, V to sequence-major for the gather, queries and output
        total += 4 * a * kv + 4 * a * q
    return total


def layer_work(m: ModelFacts, st: Setup, layer: int) -> LayerWork:
    s, d, h = st.tokens, m.hidden, m.intermediate
    ttt = layer in m.ttt_layer_indices
    recomputed = layer in checkpointed_layers(m, st)
    weights = 2 * s * _layer_weights(m, st, ttt)
    attention = 4 * m.heads * m.head_dim * attended_pairs(m, st)
    memory = s * _elementwise_bytes(m, st, ttt)
    product = 2 * s * d * h if ttt else 0
    forward_products, products = SCAN_RECOMPUTE_PRODUCTS, SCAN_PRODUCTS
    if st.cp > 1:  # the incoming state's read, and with the overlap the transfers computed ahead (1 product forward)
        forward_products += 1 + (1 if st.overlap_state_scan else 0)
        products += CP_READ_PRODUCTS + (TRANSFER_PRODUCTS if st.overlap_state_scan else 0)
    scan_fwd, scan_total = forward_products * product, products * product
    chunks = math.ceil(st.seq_len / st.cp / st.ttt.chunk_size)  # per row; rows of one layout are scanned together
    again = 1 if recomputed else 0
    return LayerWork(
        matmul=(weights, 2 * weights + again * weights),
        attention=(attention, FLASH_BACKWARD * attention + again * attention),
        scan=(scan_fwd, scan_total - scan_fwd + again * scan_fwd),
        memory=(memory, BACKWARD_ELEMENTWISE * memory + again * memory),
        scan_passes=(chunks, 2 * chunks + again * chunks) if ttt else (0, 0),
        recomputed=recomputed,
    )


def step_parameter_bytes(m: ModelFacts, st: Setup) -> float:
    """Elementwise bytes per step that scale with the parameters: the optimizer on this GPU's share, autocast's
    casts of fp32 weights where no engine hands the layers bf16 copies, the engines' copies."""
    n = m.params
    shard_params, _, shard_optim = SHARDED[st.engine]
    local = n / st.gpus if shard_optim else n
    total = ADAM_BYTES * local
    if st.engine.startswith("deepspeed"):
        total += DEEPSPEED_COPY_BYTES * local
    uses = st.grad_accum * (1 + (len(checkpointed_layers(m, st)) / m.layers))  # forwards, with recomputation
    if st.master_bytes != st.act_bytes and not shard_params:  # autocast casts each weight per forward and its
        total += uses * (FP32 + st.act_bytes) * n + st.grad_accum * (st.act_bytes + 2 * FP32) * n  # gradient back
    elif shard_params:  # FSDP2 / ZeRO-3: the gathered bf16 copies written into place, gradients cast for the reduce
        total += st.grad_accum * (2 * 2 * st.act_bytes + st.act_bytes + FP32) * n
    return total


# --- communication: what each collective moves -------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """One kind of message of one rank, repeated `calls` times per optimizer step."""

    purpose: str  # one of PURPOSES
    kind: str  # all_gather | reduce_scatter | all_reduce | all_to_all | send
    group: int  # ranks of the collective (2 for a message)
    sent: int  # bytes this rank sends per call
    calls: int
    phase: str  # forward | backward | step: where it sits (for the overlap)
    layer: int | None = None  # the decoder layer it belongs to (None: the root, or the whole step)
    spans_nodes: bool = False
    steps: int = 1  # latency steps per call (ring: group - 1; a round of messages: 1)


def _node_of(rank: int, links: Links) -> int:
    return rank // links.gpus_per_node


def _ring(purpose, kind, group, sent, calls, phase, layer, spans, all_reduce=False) -> Transfer:
    steps = (2 if all_reduce else 1) * (group - 1)
    return Transfer(purpose, kind, group, sent, calls, phase, layer, spans, steps)


def _layout(st: Setup) -> tuple[tuple[int, ...], ...]:
    return _layout_of(st.load_balance, st.cp, st.seq_len)


@lru_cache(maxsize=256)
def _layout_of(load_balance: str, cp: int, seq_len: int) -> tuple[tuple[int, ...], ...]:
    """The pieces of every CP rank for one document of `seq_len` tokens (`work` depends on the documents)."""
    return batch_layout(load_balance, cp, torch.arange(seq_len).unsqueeze(0))


def _halo_widths(st: Setup) -> tuple[int, int]:
    radius = st.ttt.conv_kernel // 2
    return {"inplace": (radius, radius), "ntp": (0, 1)}.get(st.ttt.method, (0, 0))


def _cp_messages(st: Setup, cp_rank: int, links: Links, global_rank: int):
    """Per CP message pattern of this rank: the scan's rounds (forward, reverse) and the halo's pieces. Yields
    (kind, sends) with sends a list of (round, peer rank in the group) per message."""
    layout = _layout(st)
    owner = {piece: rank for rank, pieces in enumerate(layout) for piece in pieces}
    pieces, count = layout[cp_rank], st.cp * pieces_per_rank(st.load_balance)
    forward, reverse = [], []
    for k in range(scan_rounds(count)):
        distance = 2**k
        forward.append([owner[p + distance] for p in pieces if p + distance < count and owner[p + distance] != cp_rank])
        reverse.append([owner[p - distance] for p in pieces if p - distance >= 0 and owner[p - distance] != cp_rank])
    to_next = [owner[p + 1] for p in pieces if p + 1 < count and owner[p + 1] != cp_rank]
    to_prev = [owner[p - 1] for p in pieces if p > 0 and owner[p - 1] != cp_rank]
    return forward, reverse, to_next, to_prev


def _crosses(cp_rank: int, peers: list[int], global_rank: int, links: Links) -> bool:
    base = global_rank - cp_rank
    return any(_node_of(base + peer, links) != _node_of(global_rank, links) for peer in peers)


def cp_transfers(m: ModelFacts, st: Setup, rank: int, links: Links) -> list[Transfer]:
    """What CP sends from global rank `rank` per optimizer step (see the module docstring)."""
    if st.cp == 1:
        return []
    p, b, a, acc, k = st.cp, st.batch, st.act_bytes, st.acc_bytes, st.grad_accum
    cp_rank = rank % p
    spans = p > links.gpus_per_node
    local = st.seq_len // p
    recomputed = checkpointed_layers(m, st)
    out = [_ring("positions", "all_gather", p, (p - 1) * b * local * INDEX_BYTES, k, "forward", None, spans)]
    kv = m.kv_heads * m.head_dim
    for layer in range(m.layers):
        forwards = k * (2 if layer in recomputed else 1)
        if st.attention == "ulysses":
            local_bytes = b * local * m.head_dim * (2 * m.heads + 2 * m.kv_heads) * a
            sent = local_bytes * (p - 1) // p
            out.append(Transfer("attention", "all_to_all", p, sent, forwards, "forward", layer, spans, p - 1))
            out.append(Transfer("attention", "all_to_all", p, sent, k, "backward", layer, spans, p - 1))
        else:
            shard = b * local * kv * a  # K or V of this rank
            out.append(_ring("attention", "all_gather", p, (p - 1) * shard, 2 * forwards, "forward", layer, spans))
            out.append(_ring("attention", "reduce_scatter", p, (p - 1) * shard, 2 * k, "backward", layer, spans))
    if not m.ttt_layers:
        return out
    forward_rounds, reverse_rounds, to_next, to_prev = _cp_messages(st, cp_rank, links, rank)
    before, after = _halo_widths(st)
    if before or after:  # the position rows, once per forward
        rows = len(to_next) * before + len(to_prev) * after
        crosses = _crosses(cp_rank, to_next + to_prev, rank, links)
        if rows:
            out.append(Transfer("halo", "send", 2, b * rows * INDEX_BYTES, k, "forward", None, crosses))
    pair = b * (1 + 2 * m.hidden * m.intermediate) * acc  # flag, committed, pending of one piece
    mass = b * 3 * acc if st.ttt.write == "normalized" else 0  # the gate mass's scan: d = h = 1
    for layer in m.ttt_layer_indices:
        forwards = k * (2 if layer in recomputed else 1)
        for rounds, phase, calls in ((forward_rounds, "forward", forwards), (reverse_rounds, "backward", k)):
            for peers in rounds:
                if peers:
                    crosses = _crosses(cp_rank, peers, rank, links)
                    for message in (pair, mass):
                        if message:
                            out.append(Transfer("fastweight_scan", "send", 2, len(peers) * message, calls, phase,
                                                layer, crosses))  # fmt: skip
        row = b * m.hidden * a
        forward_rows = len(to_next) * before + len(to_prev) * after
        backward_rows = len(to_next) * after + len(to_prev) * before
        crosses = _crosses(cp_rank, to_next + to_prev, rank, links)
        if forward_rows:
            out.append(Transfer("halo", "send", 2, forward_rows * row, forwards, "forward", layer, crosses))
        if backward_rows:
            out.append(Transfer("halo", "send", 2, backward_rows * row, k, "backward", layer, crosses))
    return out


def _units(m: ModelFacts) -> dict[int | None, list[tuple[str, tuple[int, ...]]]]:
    """FSDP2's units: the root (None) and each decoder layer, with their parameters' (name, shape)."""
    units: dict[int | None, list] = defaultdict(list)
    for name, shape in m.param_shapes:
        match = _LAYER.search(name)
        units[int(match.group(1)) if match else None].append((name, shape))
    return units


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _fsdp_shard(shapes, n: int) -> int:
    """Elements of one rank's shard of a unit: dim 0 of each parameter cut in n, padded."""
    return sum(math.ceil(shape[0] / n) * _numel(shape[1:]) if shape else 1 for _, shape in shapes)


def _optimizer_groups(m: ModelFacts) -> list[int]:
    """Elements of `trainer.optim.build_optimizer`'s parameter groups: base matrices, base vectors, TTT."""
    groups = [0, 0, 0]
    for name, shape in m.param_shapes:
        groups[2 if ".ttt_" in name else 0 if len(shape) >= 2 else 1] += _numel(shape)
    return [g for g in groups if g]


def engine_transfers(m: ModelFacts, st: Setup, links: Links) -> list[Transfer]:
    """What the engine sends from every rank per optimizer step (see the module docstring)."""
    n, k = st.gpus, st.grad_accum
    if n == 1:
        return []
    spans = n > links.gpus_per_node
    cuda = st.device == "cuda" and st.model_dtype != "float64"
    out = []
    if st.engine == "fsdp2":
        gather_bytes = st.act_bytes if cuda else st.master_bytes  # MixedPrecisionPolicy(param_dtype=bf16) on CUDA
        for layer, shapes in _units(m).items():
            shard = _fsdp_shard(shapes, n)
            gathers = 1 if layer is None else 2  # the root stays gathered from its forward to its backward
            out.append(_ring("parameters", "all_gather", n, (n - 1) * shard * gather_bytes, gathers * k,
                             "forward" if layer is None else "layer", layer, spans))  # fmt: skip
            out.append(_ring("gradients", "reduce_scatter", n, (n - 1) * shard * FP32, 1, "backward", layer, spans))
    elif st.engine.startswith("deepspeed"):
        comm = st.act_bytes if cuda else st.param_bytes  # DeepSpeed's bf16 module (fp32 on CPU)
        if st.engine == "deepspeed-zero2":
            total = m.params
            for bucket in range(math.ceil(total / DEEPSPEED_BUCKET)):
                numel = min(DEEPSPEED_BUCKET, total - bucket * DEEPSPEED_BUCKET)
                sent = 2 * (n - 1) * numel * comm // n
                out.append(_ring("gradients", "all_reduce", n, sent, k, "backward", None, spans, all_reduce=True))
            for group in _optimizer_groups(m):
                partition = math.ceil(group / (DEEPSPEED_ALIGNMENT * n)) * DEEPSPEED_ALIGNMENT
                out.append(_ring("parameters", "all_gather", n, (n - 1) * partition * comm, 1, "step", None, spans))
        else:  # ZeRO-3
            units = _units(m)
            later = 0  # parameters used after a unit in the forward (and so before it in the backward)
            for layer in [*sorted((u for u in units if u is not None), reverse=True), None]:
                shapes = units[layer]
                if layer is None:  # the root: its embeddings are used first in the forward, last in the backward
                    later = m.params - sum(_numel(s) for _, s in shapes)
                persistent = sum(math.ceil(_numel(s) / n) for _, s in shapes if _numel(s) <= ZERO3_PERSISTENCE)
                gathered = sum(math.ceil(_numel(s) / n) for _, s in shapes if _numel(s) > ZERO3_PERSISTENCE)
                released = 2 * later > ZERO3_REUSE_DISTANCE  # re-gathered in the backward
                if persistent:
                    out.append(_ring("parameters", "all_gather", n, (n - 1) * persistent * comm, 1, "step", layer,
                                     spans))  # fmt: skip
                if gathered:
                    out.append(_ring("parameters", "all_gather", n, (n - 1) * gathered * comm,
                                     k * (2 if released else 1), "layer", layer, spans))  # fmt: skip
                later += sum(_numel(s) for _, s in shapes)
            partition = sum(math.ceil(_numel(s) / n) for _, s in m.param_shapes)
            out.append(_ring("gradients", "reduce_scatter", n, (n - 1) * partition * comm, k, "backward", None, spans))
    elif st.engine == "ddp":
        sent = 2 * (n - 1) * m.params * st.master_bytes // n
        out.append(_ring("gradients", "all_reduce", n, sent, 1, "step", None, spans, all_reduce=True))
    return out


def transfers(m: ModelFacts, st: Setup, rank: int = 0, links: Links | None = None) -> list[Transfer]:
    links = links or Links()
    return cp_transfers(m, st, rank, links) + engine_transfers(m, st, links)


def bytes_sent(m: ModelFacts, st: Setup, rank: int = 0) -> dict[str, int]:
    """Bytes global rank `rank` sends per optimizer step, by purpose (PURPOSES)."""
    sent = dict.fromkeys(PURPOSES, 0)
    for t in transfers(m, st, rank):
        sent[t.purpose] += t.sent * t.calls
    return sent


def transfer_seconds(t: Transfer, links: Links) -> float:
    """One call of `t`."""
    if t.kind == "send":
        return t.sent / links.p2p_bandwidth(t.spans_nodes) + links.latency(t.spans_nodes)
    bandwidth = links.ring_bandwidth(t.group, t.spans_nodes)
    if t.kind == "all_to_all" and t.spans_nodes:
        bandwidth = links.p2p_bandwidth(True)  # no ring: every off-node byte crosses a card
    return t.sent / bandwidth + t.steps * links.latency(t.spans_nodes)


# --- the prediction ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    setup: Setup
    rates: Rates
    step_s: float
    parts: dict[str, float]  # seconds of the step by what takes them (compute classes, exposed communication)
    communication: dict[str, tuple[int, float]]  # purpose -> (bytes sent per step, seconds if run alone)
    model_flops: float  # per GPU and step, `model_flops`' count
    tokens: int  # per GPU and step

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s

    @property
    def mfu(self) -> float:
        return self.model_flops / self.step_s / self.rates.peak

    @property
    def bottleneck(self) -> str:
        return max(self.parts, key=self.parts.get)

    def line(self) -> str:
        return (
            f"step_s={self.step_s:.4f} tokens_per_s_per_gpu={self.tokens_per_s:.1f} mfu={self.mfu:.4f} "
            f"bottleneck={self.bottleneck.replace(' ', '_')}"
        )


def model_flops(params: int, layers: int, attention_width: int, seq_len: int) -> float:
    """Training FLOPs of one causal sequence, the MFU numerator: 6 N S + 6 L (H hd) S^2 (the matmuls' forward and
    backward, and causal attention's QK^T and PV at half of the S^2 pairs, 4 FLOPs per pair and head dimension
    forward, twice that backward)."""
    return 6 * params * seq_len + 6 * layers * attention_width * seq_len**2


def model_flops_per_gpu(m: ModelFacts, st: Setup) -> float:
    """`model_flops` of one optimizer step on one GPU: its sequences (b per micro-batch, k micro-batches), a CP
    rank holding 1/P of each."""
    sequence = model_flops(m.params, m.layers, m.heads * m.head_dim, st.seq_len)
    return sequence * st.batch * st.grad_accum / st.cp


def predict(m: ModelFacts, st: Setup, rates: Rates, links: Links | None = None) -> Prediction:
    """The step time of `st` on GPUs with these rates and links (see the module docstring)."""
    links = links or Links()
    k = st.grad_accum
    works = [layer_work(m, st, i) for i in range(m.layers)]

    def compute(work: LayerWork, phase: int) -> dict[str, float]:
        return {
            "matmuls": work.matmul[phase] / rates.matmul,
            "attention": work.attention[0] / rates.attention_forward
            if phase == 0
            else FLASH_BACKWARD * work.attention[0] / rates.attention_backward
            + (work.attention[0] / rates.attention_forward if work.recomputed else 0.0),
            "fast-weight scan": work.scan[phase] / rates.scan + work.scan_passes[phase] * rates.scan_step_s,
            "elementwise": work.memory[phase] / rates.memory,
        }

    parts = dict.fromkeys(CLASSES, 0.0)
    layer_compute = {}
    for i, work in enumerate(works):
        for phase in (0, 1):
            seconds = compute(work, phase)
            layer_compute[i, phase] = sum(seconds.values())
            for name, value in seconds.items():
                parts[name] += k * value
    outside = k * _outside_bytes(m, st) / rates.memory
    parts["loss head"] = k * 6 * st.tokens * m.hidden * m.vocab / rates.loss
    parts["elementwise"] += outside + step_parameter_bytes(m, st) / rates.memory

    # Communication: run alone, and what of it the step waits for.
    all_transfers = transfers(m, st, _critical_rank(m, st, links), links)
    communication: dict[str, tuple[int, float]] = {}
    for t in all_transfers:
        sent, seconds = communication.get(t.purpose, (0, 0.0))
        communication[t.purpose] = (sent + t.sent * t.calls, seconds + transfer_seconds(t, links) * t.calls)
    cp_exposed, engine_exposed = 0.0, 0.0
    engine_by_layer: dict[tuple[int, int], float] = defaultdict(float)  # (layer, phase) -> seconds per step
    scan_by_layer: dict[tuple[int, int], float] = defaultdict(float)
    prefetched = st.engine in ("fsdp2", "deepspeed-zero3")
    for t in all_transfers:
        one = transfer_seconds(t, links)
        if t.purpose in ("parameters", "gradients"):
            if prefetched and t.layer is not None and t.phase in ("layer", "backward"):
                forward = k * one if t.phase == "layer" else 0.0  # a layer's gathers: the forward's, then the rest
                engine_by_layer[t.layer, 0] += forward
                engine_by_layer[t.layer, 1] += one * t.calls - forward
            elif st.engine == "deepspeed-zero3" and t.phase == "backward":  # one flat reduce-scatter, overlapped
                for i in range(m.layers):
                    engine_by_layer[i, 1] += one * t.calls / m.layers
            else:
                engine_exposed += one * t.calls
        elif t.purpose == "fastweight_scan":
            scan_by_layer[t.layer, 0 if t.phase == "forward" else 1] += one * t.calls
        else:
            cp_exposed += one * t.calls
    for (layer, phase), seconds in engine_by_layer.items():
        engine_exposed += max(0.0, seconds - k * layer_compute[layer, phase])
    if prefetched and st.gpus > 1:  # the first layer's gather has no compute before it
        first = next(t for t in all_transfers if t.layer == 0 and t.purpose == "parameters" and t.phase == "layer")
        engine_exposed += k * transfer_seconds(first, links)
    scan_exposed = 0.0
    for (layer, phase), seconds in scan_by_layer.items():
        local = k * works[layer].scan[phase] / rates.scan if st.overlap_state_scan else 0.0
        scan_exposed += max(0.0, seconds - local)
    parts["CP communication"] = cp_exposed
    parts["state scan communication"] = scan_exposed
    parts["engine communication"] = engine_exposed
    step = sum(parts.values())
    tokens = st.tokens * k
    return Prediction(st, rates, step, parts, communication, model_flops_per_gpu(m, st), tokens)


def _critical_rank(m: ModelFacts, st: Setup, links: Links) -> int:
    """The CP rank with the most to send (ranks of one group differ in the scan's and the halo's messages)."""
    if st.cp == 1 or not m.ttt_layers:
        return 0
    return max(range(st.cp), key=lambda r: sum(t.sent * t.calls for t in cp_transfers(m, st, r, links)))


def predict_step(job: JobConfig, checkpoint_every: int | None, rates: Rates | None = None) -> Prediction:
    """The prediction of one single-GPU CUDA step of `job` with the activation checkpointing the trainer resolved
    (`checkpoint_every`, None: off): what `ttt-gpu-check` prints beside each measured step. `rates`: the
    built-in H200 ones unless given (`builtin_rates(gpu_of_device(torch.cuda.get_device_name()) or "h100")`)."""
    setup = setup_of(job, 1, "cuda")
    setup = replace(setup, checkpointing=checkpoint_every is not None, checkpoint_every=checkpoint_every or 1)
    return predict(_facts(job), setup, rates or builtin_rates("h200"))


_FACTS: dict[str, ModelFacts] = {}


def _facts(job: JobConfig) -> ModelFacts:
    """The facts of the job's model, built once per model and TTT config in a process."""
    key = repr((job.model, job.ttt))
    if key not in _FACTS:
        _FACTS[key] = model_facts(meta_model(job))
    return _FACTS[key]


# --- rates from a gpu_check report ---------------------------------------------------------------------------

_KERNEL_CLASSES = (  # first match wins, on the lower-cased kernel name
    ("attention_backward", ("bprop", "flash_bwd", "fmha_bwd", "attn_bwd", "attnbwd", "dq_dk_dv")),
    ("attention_forward", ("fprop", "flash_fwd", "fmha_fwd", "attn_fwd", "attnfwd", "flash_attn")),
    ("scan", ("_walk_kernel", "_reverse_kernel")),
    ("loss", ("cross_entropy", "element_mul", "liger")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "wgmma")),
)


def kernel_class(name: str) -> str:
    """The rate a CUDA kernel's time is charged to (`Rates` field), by its name; "memory" for the rest."""
    lower = name.lower()
    return next((rate for rate, keys in _KERNEL_CLASSES if any(key in lower for key in keys)), "memory")


def _profiled_runs(report: dict) -> list[dict]:
    runs = [r.get("data", {}) for r in report.get("results", [])]
    return [d for d in runs if isinstance(d.get("profile"), dict) and d["profile"].get("kernels") and "ttt" in d]


def rates_from_gpu_check(path: Path, gpu: str | None = None) -> Rates:
    """Rates from a `ttt-gpu-check` JSON report: every profiled training step (the model, ttt, length,
    checkpointing and compilation it ran, and `tools.gpu.step_profile`'s kernels) charges its kernels' GPU time to
    their class (`kernel_class`), and a class's rate is the work this model counts for those steps over that time.
    Device time the profile does not list by kernel (it keeps the top kernels only) is charged to the elementwise
    class. A class no profiled step ran (the scan, without a TTT run) keeps the built-in rate of the report's GPU."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise PlanTimeError(f"--rates {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(report, dict) or "results" not in report:
        raise PlanTimeError(f"--rates {path}: not a ttt-gpu-check report (no 'results')")
    gpu = gpu or gpu_of_device(str(report.get("device", ""))) or "h100"
    base = builtin_rates(gpu)
    runs = _profiled_runs(report)
    if not runs:
        raise PlanTimeError(f"--rates {path}: no profiled training step in the report (device {report.get('device')})")
    work, seconds = defaultdict(float), defaultdict(float)
    for run in runs:
        job = one_process_job(run["model"], run["ttt"], run["seq_len"])
        job = replace(job, train=replace(job.train, compile=bool(run.get("compiled", True))))
        prediction = predict_step(job, run.get("checkpoint_every"), base)
        for name, value in _class_work(_facts(job), prediction.setup).items():
            work[name] += value
        profile = run["profile"]
        listed = 0.0
        for kernel in profile["kernels"]:
            seconds[kernel_class(kernel["name"])] += kernel["total_ms"] / 1e3
            listed += kernel["total_ms"] / 1e3
        seconds["memory"] += max(0.0, profile.get("device_time_ms", 0.0) / 1e3 - listed)
    fields, sources = {}, dict(base.sources)
    for name in ("attention_forward", "attention_backward", "matmul", "loss", "scan", "memory"):
        if work[name] > 0 and seconds[name] > 0:
            fields[name] = work[name] / seconds[name]
            sources[name] = f"{path}: {len(runs)} profiled step(s) on {report.get('device')}"
    return replace(base, gpu=f"{gpu} ({path})", sources=tuple(sources.items()), **fields)


def _class_work(m: ModelFacts, st: Setup) -> dict[str, float]:
    """One step's work per rate class: FLOPs, and bytes for `memory`."""
    works = [layer_work(m, st, i) for i in range(m.layers)]
    k = st.grad_accum
    backward = FLASH_BACKWARD * sum(w.attention[0] for w in works)  # the rest of attention[1] is recomputation
    return {
        "attention_forward": k * (sum(sum(w.attention) for w in works) - backward),
        "attention_backward": k * backward,
        "matmul": k * sum(sum(w.matmul) for w in works),
        "loss": k * 6 * st.tokens * m.hidden * m.vocab,
        "scan": k * sum(sum(w.scan) for w in works),
        "memory": k * (sum(sum(w.memory) for w in works) + _outside_bytes(m, st)) + step_parameter_bytes(m, st),
    }


def _outside_bytes(m: ModelFacts, st: Setup) -> float:
    """Per micro-batch, outside the layers: the embedding's lookup and the final norm, forward and backward."""
    return (1 + BACKWARD_ELEMENTWISE) * st.tokens * (2 * m.hidden * st.act_bytes + _norm_bytes(m.hidden, FP32))


# --- the fastest split ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    prediction: Prediction
    memory_bytes: int


def candidate_splits(m: ModelFacts, st: Setup, budget_bytes: int, rates: Rates, links: Links,
                     auto_checkpointing: bool = True) -> list[Split]:  # fmt: skip
    """Every CP degree (power of two dividing the GPUs, suiting the length) whose step fits the budget with the
    margin `train.activation_checkpointing=auto` keeps (AUTO_BUDGET: the plan within 90% of the memory), with
    activation checkpointing as `auto` resolves it (when `auto_checkpointing`), predicted."""
    chunk = st.ttt.chunk_size if st.ttt.method != "none" else 1
    splits = []
    for cp in (2**i for i in range(st.gpus.bit_length())):
        if st.gpus % cp:
            continue
        try:
            check_cp(st.gpus, cp, st.seq_len, chunk, st.load_balance if cp > 1 else "contiguous")
        except ValueError:
            continue
        candidate = replace(st, cp=cp)
        if auto_checkpointing:
            candidate = cheapest_checkpointing(m, candidate, int(AUTO_BUDGET * budget_bytes))
        memory = plan(m, candidate).total
        if memory <= AUTO_BUDGET * budget_bytes:
            splits.append(Split(predict(m, candidate, rates, links), memory))
    return splits


def fastest_split(m: ModelFacts, st: Setup, budget_bytes: int, rates: Rates, links: Links,
                  auto_checkpointing: bool = True) -> Split | None:  # fmt: skip
    splits = candidate_splits(m, st, budget_bytes, rates, links, auto_checkpointing)
    return max(splits, key=lambda s: s.prediction.tokens_per_s, default=None)


# --- the report ----------------------------------------------------------------------------------------------
