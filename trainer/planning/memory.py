"""Per-GPU memory of one training step, planned from a job's config; its command line is `ttt-plan memory`
(tools/commands/plan.py), and `train.activation_checkpointing=auto` asks `auto_checkpoint_every` here.

    ttt-plan memory model=qwen3-8b data.seq_len=131072 parallel.cp=8 \\
        train.activation_checkpointing=true --gpus 64 --gpu-memory-gb 80

The model is built on the meta device (exact parameter counts, no memory); every other number comes from the
formulas below, which follow the code the step runs: the per-GPU bytes row by row at the step's peak, and the
smallest context-parallel degree that fits the GPU.

Notation: N GPUs, CP degree P, b sequences of S tokens per data-parallel rank, so s = b S / P tokens
on one GPU; a = activation bytes (bf16 under the loop's CUDA autocast, the model dtype on CPU); L
decoder layers of which T are TTT layers; d x h the MLP; steady state (optimizer states exist).
- parameters, gradients: stored in `trainer.model.master_dtype`: a bf16 model keeps fp32 master weights
  and gradients on CUDA and computes with bf16 copies (FSDP2 gathers them per unit; without
  sharding, autocast's casts of every weight are saved for the backward); DeepSpeed keeps a bf16
  module and its own fp32 master copy in the optimizer. optimizer: AdamW m and v in fp32 (with
  mixed precision 16 bytes per parameter in all). Engines
  (`parallel.engine`; one GPU runs none): `ddp` replicates all three; `fsdp2` shards all three over
  the N GPUs (data x context parallel) and holds the root module (embeddings, final norm, head) and
  two decoder layers (the running and the prefetched one) unsharded; `deepspeed` with
  `parallel.zero_stage` 2 shards gradients and optimizer states, with 3 the parameters too (as
  fsdp2); `parallel.offload` moves the optimizer states to CPU memory. ddp's flat all-reduce copies
  the gradients once; DeepSpeed's communication buckets are not counted.
- activations: what autograd saves per decoder layer, from the code: RMSNorms keep an fp32 copy of
  their input, normalized values and output; Qwen3's per-head query/key norms the same; SDPA keeps
  queries, keys, values, output and fp32 log-sum-exp; the MLP its gate, activation, up and product
  (h wide); a TTT layer its value targets (and NTP's shifted source, or the conv output of inplace),
  and with `ttt.write=normalized` its unit keys (h wide).
  Context parallelism (`parallel.load_balance`: rank r holds piece r, or pieces r and 2P-1-r of 2P):
  the all-gather attention runs a segment plan (`parallel.segments`, one document per sequence: each
  local piece attends the keys from the sequence start to its end) and keeps the keys it packs for
  its pieces (a view of the gathered K/V when they form one run, a copy otherwise); on CUDA one varlen
  flash call keeps its token-major queries, output and log-sum-exp and two int32 cu_seqlens per
  segment: no mask of any size. On CPU, SDPA keeps a float band mask per 2048-query block of each
  segment whose keys start before its queries. Ulysses holds all S tokens for 1/P of the heads, in
  sequence order: one causal segment, no mask. The planned rank is the one holding the most.
  With P = 1 the loop runs transformers' causal SDPA: no mask (one document per sequence).
  `train.activation_checkpointing` keeps only the inputs of the layers it recomputes (every
  `train.checkpoint_every_n_layers`-th) and rebuilds one of them at a time in the backward.
- fast-weight states: (committed, pending) pairs of d x h fp32 per sequence. The chunk scan's backward
  holds three (its recomputed state, the state's gradient, the gradient it returns); under CP the
  state scan sends and receives one pair and each TTT layer keeps its incoming pair until its backward.
- loss (`trainer.ops.loss.linear_cross_entropy`), its largest moment: on CUDA liger-kernel's fused
  linear cross-entropy computes both gradients in its forward, r token rows at a time (V the vocabulary,
  r = min(s, ceil(s / ceil(V / d)) rounded up to a power of two)): it holds the gradient of the hidden
  states (a), the head's gradient accumulated in fp32, the per-token loss in fp32, and one (r x V) logits
  block (a) or, at its end, the head's gradient cast to a; beside that the casts to a of the hidden states
  and the head when the step's weights are fp32 (no engine shards them). Its backward holds the two
  gradients in a and, behind those casts, the hidden states' fp32 gradient (the head's is a root
  gradient). The torch path (CPU, fp64) holds two (4096 x V) fp32 blocks, an fp32 copy of the head, its
  fp32 gradient and the hidden states' gradient.

The step's peak is the largest of three moments: the loss's backward (every activation saved), the
decoder's backward at its largest (layer by layer from the last: what the layers below kept, the layer's own
activations, rebuilt when it is recomputed, its gradients in flight, the gradients accumulated so far) and the
optimizer step (all gradients); the table shows what each row holds at the peak and its own largest value over
the step.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, replace

import torch

from parallel.mesh import check_cp
from parallel.pieces import batch_layout
from parallel.segments import QUERY_BLOCK, SegmentPlan, layout_plans
from trainer.config import JobConfig
from trainer.model import DTYPES, build_meta_model, master_dtype
from trainer.ops.loss import linear_cross_entropy
from trainer.ttt import TTTConfig
from trainer.ttt.patch import decoder_of

GIB = 2**30
DEVICES = ("cuda", "cpu")
# What each engine shards over all GPUs: (parameters, gradients, optimizer states).
SHARDED = {
    "single": (False, False, False),
    "ddp": (False, False, False),
    "fsdp2": (True, True, True),
    "deepspeed-zero2": (False, True, True),
    "deepspeed-zero3": (True, True, True),
}
FP32 = 4
NORM_BYTES = FP32  # RMSNorm computes in fp32
LSE_BYTES = FP32  # SDPA and the loss keep log-sum-exp in fp32
INDEX_BYTES = 8  # int64 token ids and labels
ADAM_STATE_BYTES = 2 * FP32  # m and v
SCAN_WORKING_PAIRS = 3  # the chunk scan's backward: recomputed state, its gradient, the returned gradient
CP_MESSAGE_PAIRS = 2  # the state scan's message out and in
LOSS_CHUNK = inspect.signature(linear_cross_entropy).parameters["chunk_size"].default
ROWS = ("parameters", "gradients", "optimizer", "activations", "fast-weight states", "loss")


# --- the job's model on the meta device ---------------------------------------------------------------


def meta_model(job: JobConfig) -> torch.nn.Module:
    """The patched model on the meta device: exact shapes, no memory. A `model.path` folder is read
    for its config.json only."""
    return build_meta_model(job.model, job.ttt)


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs from the model, read off the (meta) model itself."""

    base_params: int  # shared (tied) tensors counted once
    ttt_params: int  # ttt_conv, ttt_proj and ttt_gate of the TTT layers
    root_params: int  # outside the decoder layers: embeddings, final norm, head
    largest_layer_params: int  # the biggest decoder layer, TTT parameters included
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    ttt_layer_indices: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: bool  # Qwen3 normalizes queries and keys per head
    # (name, shape) of every parameter, a tied one once: what engines shard and communicate (the step-time model)
    param_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def params(self) -> int:
        return self.base_params + self.ttt_params

    @property
    def ttt_layers(self) -> int:
        return len(self.ttt_layer_indices)


def model_facts(model: torch.nn.Module) -> ModelFacts:
    params = dict(model.named_parameters())  # a tied matrix appears once
    layers = decoder_of(model).layers
    layer_sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    config = model.config
    return ModelFacts(
        base_params=sum(p.numel() for name, p in params.items() if "ttt_" not in name),
        ttt_params=sum(p.numel() for name, p in params.items() if "ttt_" in name),
        root_params=sum(p.numel() for p in params.values()) - sum(layer_sizes),
        largest_layer_params=max(layer_sizes),
        vocab=config.vocab_size,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=len(layers),
        ttt_layer_indices=tuple(getattr(model, "ttt_layers", ())),
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        qk_norm=hasattr(layers[0].self_attn, "q_norm"),
        param_shapes=tuple((name, tuple(p.shape)) for name, p in params.items()),
    )


@dataclass(frozen=True)
class Setup:
    """The run settings the memory depends on."""

    seq_len: int
    batch: int
    cp: int
    gpus: int
    engine: str  # a key of SHARDED
    offload: bool  # optimizer states in CPU memory
    checkpointing: bool
    checkpoint_every: int  # transformers recomputes the layers whose index is a multiple of it
    attention: str
    load_balance: str  # parallel.load_balance: which pieces of the sequence a CP rank holds
    model_dtype: str  # model.dtype: what weights compute in
    device: str
    act_bytes: int
    fused_loss: bool  # the loss runs liger-kernel's fused linear cross-entropy (CUDA) rather than the torch path
    ttt: TTTConfig
    # What the step time depends on besides (`trainer.planning.step_time`):
    compiled: bool = False  # train.compile resolved: regional compilation fuses each layer's elementwise ops
    overlap_state_scan: bool = False  # parallel.overlap_state_scan
    grad_accum: int = 1  # micro-batches per optimizer step

    @property
    def param_bytes(self) -> int:
        return DTYPES[self.model_dtype].itemsize

    @property
    def master_bytes(self) -> int:
        """What parameters are stored and updated in (`trainer.model.master_dtype`)."""
        return master_dtype(self.model_dtype, torch.device(self.device), self.engine.split("-")[0]).itemsize

    @property
    def tokens(self) -> int:
        """Tokens on one GPU: its shard of each of its sequences."""
        return self.batch * self.seq_len // self.cp

    @property
    def fp32_residual(self) -> bool:
        """fp32 weights computing under autocast (no engine casts them to bf16): the embeddings, and so the
        residual stream and every RMSNorm's input, are fp32."""
        return self.act_bytes < FP32 and self.master_bytes == FP32 and not SHARDED[self.engine][0]

    @property
    def acc_bytes(self) -> int:
        """Fast-weight states and the loss accumulate in at least fp32."""
        return max(self.act_bytes, FP32)


def _engine(engine: str, zero_stage: int, gpus: int) -> str:
    """The key of SHARDED: one process runs no engine (the loop's single-process path)."""
    if gpus == 1:
        return "single"
    return f"deepspeed-zero{zero_stage}" if engine == "deepspeed" else engine


def setup_of(job: JobConfig, gpus: int, device: str) -> Setup:
    param_bytes = DTYPES[job.model.dtype].itemsize
    cuda = device == "cuda" and job.model.dtype != "float64"  # bf16 autocast and the fused loss
    par = job.parallel
    return Setup(
        seq_len=job.data.seq_len,
        batch=job.data.batch_size,
        cp=par.cp,
        gpus=gpus,
        engine=_engine(par.engine, par.zero_stage, gpus),
        offload=par.engine == "deepspeed" and par.offload and gpus > 1,
        checkpointing=bool(job.train.activation_checkpointing),  # auto (None) is resolved by `cheapest_checkpointing`
        checkpoint_every=job.train.checkpoint_every_n_layers,
        attention=par.attention,
        load_balance=par.load_balance,
        model_dtype=job.model.dtype,
        device=device,
        act_bytes=torch.bfloat16.itemsize if cuda else param_bytes,
        fused_loss=cuda,
        ttt=job.ttt,
        compiled=job.train.compiles(device) and not (par.engine == "deepspeed" and par.zero_stage == 3 and gpus > 1),
        overlap_state_scan=par.overlap_state_scan,
        grad_accum=job.train.grad_accum,
    )


# --- activations -----------------------------------------------------------------------------------


def _norm(width: int, st: Setup, readers: int = 1) -> int:
    """Per token: an RMSNorm's fp32 input and rsqrt, its normalized values, and what the `readers` linear layers
    reading its output keep of it. On a bf16 residual stream the normalized values and the output are in a, the
    output shared by its readers. On an fp32 one (`Setup.fp32_residual`) the normalized values stay fp32 and
    every reader keeps its own cast to a (autocast caches the casts of weights, not of activations)."""
    a = st.act_bytes
    if st.fp32_residual:
        return (2 * NORM_BYTES + readers * a) * width + NORM_BYTES
    return (NORM_BYTES + 2 * a) * width + NORM_BYTES


def _mask_elements(shift: int, queries: int) -> int:
    """Query-key pairs of the CPU band masks of one segment whose keys start `shift` before its
    queries: each block of QUERY_BLOCK queries sees every key up to its last query."""
    if not shift:
        return 0  # a square segment runs as causal SDPA, unmasked
    blocks = range(0, queries, QUERY_BLOCK)
    return sum(min(QUERY_BLOCK, queries - i) * (shift + min(i + QUERY_BLOCK, queries)) for i in blocks)


@functools.lru_cache(maxsize=64)
def _rank_plans(seq_len: int, cp: int, load_balance: str) -> tuple[SegmentPlan, ...]:
    """The all-gather attention's segment plan of every rank, one document per sequence."""
    positions = torch.arange(seq_len).unsqueeze(0)
    return layout_plans(positions, batch_layout(load_balance, cp, positions))


def kept_key_tokens(plan: SegmentPlan, seq_len: int, cuda: bool) -> int:
    """Key tokens the kernels keep. CUDA: the packed keys, a view of the whole gathered buffer when they
    form one run; CPU: SDPA's own contiguous copy of each segment's keys."""
    if not cuda:
        return sum(s.k_hi - s.k_lo for s in plan.segments)
    return seq_len if len(plan.key_runs) == 1 else sum(end - start for _, start, end in plan.key_runs)


@dataclass(frozen=True)
class Attention:
    saved: int  # what one layer's attention saves for the backward, the two below included
    kv: int  # the keys and values the kernel attends to
    mask: int  # CPU only: float copies of the segments' band masks
    backward: int  # gradients its backward adds while the saved tensors are still held


def attention_bytes(m: ModelFacts, st: Setup) -> Attention:
    a, s = st.act_bytes, st.tokens
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    saved = (
        _norm(m.hidden, st, readers=3) + a * q + LSE_BYTES * m.heads
    ) * s  # input norm (q, k, v read it), queries, lse
    if m.qk_norm:  # per-head RMSNorms before the rotation (their outputs are rotated, not saved)
        saved += ((NORM_BYTES + a) * (q + kv) + NORM_BYTES * (m.heads + m.kv_heads)) * s
    if st.cp == 1:  # transformers' causal SDPA; its output is o_proj's input
        kv_bytes = 2 * a * kv * s
        return Attention(saved + kv_bytes + a * q * s, kv_bytes, 0, a * (q + 2 * kv) * s)
    cuda = st.device == "cuda"
    # CUDA: the varlen output is o_proj's input; CPU: the per-segment outputs and their concatenation.
    out = (1 if cuda else 2) * a * q * s
    if st.attention == "allgather":

        def held(plan: SegmentPlan) -> tuple[int, int, int]:
            kv_bytes = 2 * a * kv * st.batch * kept_key_tokens(plan, st.seq_len, cuda)
            segments = plan.segments
            workspace = 2 * 4 * (len(segments) + 1) * st.batch if cuda else 0  # int32 cu_seqlens
            mask = (
                0
                if cuda
                else sum(_mask_elements(s.k_hi - s.k_lo - (s.q_hi - s.q_lo), s.q_hi - s.q_lo) for s in segments)
            )
            return kv_bytes + workspace + a * st.batch * mask, kv_bytes, a * st.batch * mask

        extra, kv_bytes, mask = max(held(plan) for plan in _rank_plans(st.seq_len, st.cp, st.load_balance))
        gathered = 2 * a * kv * st.batch * st.seq_len
        backward = a * q * s + kv_bytes + gathered  # gradients of the packed and of the gathered K/V
        return Attention(saved + out + extra, kv_bytes, mask, backward)
    kv_bytes = 2 * a * kv * s  # Ulysses: all S tokens for 1/P of the heads, one causal segment
    return Attention(saved + out + kv_bytes, kv_bytes, 0, a * (q + 2 * kv) * s)


def mlp_bytes(m: ModelFacts, st: Setup) -> int:
    """Per layer: the post-attention norm and the gate, activation, up and product (h wide)."""
    return (_norm(m.hidden, st, readers=2) + 4 * st.act_bytes * m.intermediate) * st.tokens  # gate and up read it


def ttt_extra_bytes(m: ModelFacts, st: Setup) -> int:
    """Per TTT layer: the value targets V, the method's intermediate target, the normalized write's unit
    keys (h wide), its gated values g V and the gated sum it divides by the gate mass (d wide each), six
    per-token scalars (the key norm, the gate's logit and value, the mass's unit key, the mass and its clamp),
    the division's bool mask and what the mass's prefix sums keep (`chunk_sum`: the fp64 sums and two int64
    gather indices per token), and under CP the fp32 copy of Z that reads the incoming state (when Z is not
    fp32 already)."""
    a, d = st.act_bytes, m.hidden
    per_token = a * d
    if st.ttt.write == "normalized":
        per_token += a * m.intermediate + 2 * a * d + 6 * a + 1 + 3 * INDEX_BYTES
        per_token += a * d if st.fp32_residual else 0  # the gate's own cast of the MLP input
    if st.ttt.method == "ntp":
        per_token += a * d + a  # the shifted source and its next-in-document mask
    elif st.ttt.method == "inplace" and st.ttt.proj:
        per_token += a * d  # the conv output that P multiplies
    if st.fp32_residual and st.ttt.method in ("inplace", "recon"):
        per_token += a * d  # the target source's cast to a, which the conv or P keeps
    if st.cp > 1 and st.acc_bytes != a:
        per_token += st.acc_bytes * m.intermediate
    return per_token * st.tokens


def _mlp_backward_bytes(m: ModelFacts, st: Setup) -> int:
    """Gradients the MLP's backward adds while its saved tensors are held: two h wide; in a TTT layer
    the gradient of Z from down_proj, the chunk scan's fp32 one and its cast."""
    a, h = st.act_bytes, m.intermediate
    if not m.ttt_layers:
        return 2 * a * h * st.tokens
    return (a + st.acc_bytes + (a if a != st.acc_bytes else 0)) * h * st.tokens


def checkpointed_layers(m: ModelFacts, st: Setup) -> set[int]:
    """The decoder layers activation checkpointing recomputes (`train.checkpoint_every_n_layers`)."""
    return {i for i in range(m.layers) if i % st.checkpoint_every == 0} if st.checkpointing else set()


@dataclass(frozen=True)
class Activations:
    attention: Attention  # per layer
    mlp: int  # per layer
    ttt_extra: int  # per TTT layer
    outside: int  # token ids and labels, rotary tables, final norm, the loss's log-sum-exp (once per step)
    saved: int  # held when the backward starts
    recomputed: int  # the largest checkpointed layer, rebuilt in its backward
    backward: int  # gradients in flight in one layer's backward
    kept: tuple[int, ...]  # per decoder layer, what it keeps until its backward (its input alone if recomputed)
    rebuilt: tuple[int, ...]  # per decoder layer, what its backward rebuilds first (0 unless recomputed)


def activations_of(m: ModelFacts, st: Setup) -> Activations:
    a, s = st.act_bytes, st.tokens
    attention, mlp, ttt_extra = attention_bytes(m, st), mlp_bytes(m, st), ttt_extra_bytes(m, st)
    outside = (2 * INDEX_BYTES + 2 * a * m.head_dim + _norm(m.hidden, st) + LSE_BYTES) * s
    if m.ttt_layers and st.ttt.method == "inplace":
        outside += INDEX_BYTES * s  # the chunk-segment ids the target conv keeps

    def layer(i: int) -> int:
        return attention.saved + mlp + (ttt_extra if i in m.ttt_layer_indices else 0)

    recomputed = checkpointed_layers(m, st)
    checkpoint = a * m.hidden * s  # a recomputed layer keeps only its input
    kept = tuple(checkpoint if i in recomputed else layer(i) for i in range(m.layers))
    rebuilt = tuple(layer(i) if i in recomputed else 0 for i in range(m.layers))
    backward = max(attention.backward, _mlp_backward_bytes(m, st))
    return Activations(
        attention=attention,
        mlp=mlp,
        ttt_extra=ttt_extra if m.ttt_layers else 0,
        outside=outside,
        saved=sum(kept) + outside,
        recomputed=max(rebuilt),
        backward=backward,
        kept=kept,
        rebuilt=rebuilt,
    )


# --- fast-weight states, loss, parameters --------------------------------------------------------------


def _state_pair_bytes(m: ModelFacts, st: Setup) -> int:
    return 2 * m.hidden * m.intermediate * st.acc_bytes * st.batch


def kept_state_pairs(m: ModelFacts, st: Setup, layers: range) -> int:
    """Incoming CP states the TTT layers among `layers` keep for their backward (a recomputed one receives
    its state again when its backward rebuilds it)."""
    if st.cp == 1:
        return 0
    recomputed = checkpointed_layers(m, st)
    return sum(1 for i in m.ttt_layer_indices if i in layers and i not in recomputed)


def loss_bytes(m: ModelFacts, st: Setup) -> int:
    """The loss's working set at its largest moment."""
    head, hidden = m.vocab * m.hidden, st.tokens * m.hidden
    if st.fused_loss:  # liger's forward computes both gradients (trainer/ops/loss.py); a is what it runs in
        a = st.act_bytes
        cast = st.master_bytes != a and not SHARDED[st.engine][0]  # fp32 weights: hidden states and head cast to a
        casts = (hidden + head) * a if cast else 0
        chunks = math.ceil(m.vocab / m.hidden)  # liger's: a (rows x V) block of logits is about the size of hidden
        rows = min(st.tokens, 1 << (math.ceil(st.tokens / chunks) - 1).bit_length())  # rounded up to a power of 2
        # the hidden states' gradient, the head's in fp32, the per-token loss; the logits block in the
        # loop, then the head's gradient cast to a (the block freed first)
        forward = casts + hidden * a + head * FP32 + st.tokens * FP32 + max(rows * m.vocab * a, head * a)
        backward = (hidden + head) * a + (hidden * FP32 if cast else 0)  # the casts' backward: fp32 gradients
        return max(forward, backward)
    acc = st.acc_bytes
    blocks = 2 * min(LOSS_CHUNK, st.tokens) * m.vocab * acc  # a logits block and its softmax
    head_copy = head * acc if st.param_bytes != acc else 0
    return blocks + head_copy + head * acc + hidden * st.act_bytes


def state_bytes(m: ModelFacts, st: Setup) -> tuple[int, int, int]:
    """Parameters (with what a sharding engine gathers), all gradients, optimizer states per GPU."""
    shard_params, shard_grads, shard_optim = SHARDED[st.engine]
    total, p, master = m.params, st.param_bytes, st.master_bytes
    if shard_params:  # gathered for compute: the root and two decoder layers
        params = math.ceil(total * master / st.gpus) + (m.root_params + 2 * m.largest_layer_params) * p
    else:  # with fp32 masters, autocast's compute copy of every weight
        params = total * master + (total * p if master != p else 0)
    grads = math.ceil(total * master / st.gpus) if shard_grads else total * master
    optim_bytes = ADAM_STATE_BYTES + (FP32 if master < FP32 else 0)  # m, v and DeepSpeed's fp32 master copy
    optim = math.ceil(total * optim_bytes / st.gpus) if shard_optim else total * optim_bytes
    return params, grads, 0 if st.offload else optim


# --- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    setup: Setup
    activations: Activations
    moments: dict[str, dict[str, int]]  # moment of the step -> row -> bytes held then

    @property
    def peak(self) -> str:
        return max(self.moments, key=lambda moment: sum(self.moments[moment].values()))

    @property
    def rows(self) -> dict[str, int]:
        return self.moments[self.peak]

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def largest(self, row: str) -> int:
        return max(held[row] for held in self.moments.values())


def _largest_layer_backward(m: ModelFacts, st: Setup, act: Activations, root_grads: int) -> tuple[int, int, int]:
    """(gradients, activations, fast-weight states) at the largest moment of the decoder's backward. Layer i's
    backward holds what the layers below it kept, its own activations (rebuilt beside its kept input when
    recomputed), the gradients in flight, and the gradients of the root and the layers from i up (sharded, those
    above, by an engine that shards them); the layers above have freed what they kept."""
    pair = _state_pair_bytes(m, st)
    working_pairs = SCAN_WORKING_PAIRS + (CP_MESSAGE_PAIRS if st.cp > 1 else 0)
    layer_grads = m.largest_layer_params * st.master_bytes
    above_share = st.gpus if SHARDED[st.engine][1] else 1

    def held(i: int) -> tuple[int, int, int]:
        grads = root_grads + layer_grads + math.ceil((m.layers - 1 - i) * layer_grads / above_share)
        activations = act.outside + sum(act.kept[: i + 1]) + act.rebuilt[i] + act.backward
        ttt = i in m.ttt_layer_indices  # it holds its incoming state (kept or received again) and the scan's
        states = kept_state_pairs(m, st, range(i)) + ((1 if st.cp > 1 else 0) + working_pairs if ttt else 0)
        return grads, activations, states * pair

    return max((held(i) for i in range(m.layers)), key=sum)


def plan(m: ModelFacts, st: Setup) -> Plan:
    params, grads, optim = state_bytes(m, st)
    act = activations_of(m, st)
    pair = _state_pair_bytes(m, st)
    root_grads = m.root_params * st.master_bytes  # the head's gradient arrives first
    moments = {
        "loss backward": (root_grads, act.saved, kept_state_pairs(m, st, range(m.layers)) * pair, loss_bytes(m, st)),
        "decoder backward": (*_largest_layer_backward(m, st, act, root_grads), 0),
        "optimizer step": (grads * (2 if st.engine == "ddp" else 1), 0, 0, 0),  # ddp: + the flat all-reduce copy
    }
    held = {
        moment: dict(zip(ROWS, (params, grads_then, optim, activations, states, loss)))
        for moment, (grads_then, activations, states, loss) in moments.items()
    }
    return Plan(st, act, held)


AUTO_BUDGET = 0.9  # of the GPU's memory: what `train.activation_checkpointing=auto` plans a step into


def cheapest_checkpointing(m: ModelFacts, st: Setup, budget_bytes: int) -> Setup:
    """The activation checkpointing that recomputes the fewest decoder layers while the step fits the budget:
    none, else every n-th layer (`train.checkpoint_every_n_layers`) for the largest n, else every layer (which
    may still not fit: then the step is as small as checkpointing makes it). Recomputing a layer costs its
    forward again, about a third of its step, whichever layer it is."""
    candidates = [replace(st, checkpointing=False)]
    candidates += [replace(st, checkpointing=True, checkpoint_every=n) for n in range(m.layers, 0, -1)]
    return next((c for c in candidates if plan(m, c).total <= budget_bytes), candidates[-1])


def auto_checkpoint_every(job: JobConfig, model: torch.nn.Module, gpus: int) -> int | None:
    """`train.activation_checkpointing=auto` on this CUDA device: the `checkpoint_every_n_layers` to run with
    (None: no checkpointing), from the plan of `job` on `model` (the meta model the trainer builds)."""
    budget = int(AUTO_BUDGET * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    chosen = cheapest_checkpointing(model_facts(model), setup_of(job, gpus, "cuda"), budget)
    return chosen.checkpoint_every if chosen.checkpointing else None


def smallest_fitting_cp(m: ModelFacts, st: Setup, budget_bytes: int) -> Plan | None:
    """The plan at the smallest power-of-two CP degree that divides the GPUs, suits the sequence
    length and fits the budget; None if none does."""
    chunk = st.ttt.chunk_size if st.ttt.method != "none" else 1
    for cp in (2**k for k in range(st.gpus.bit_length())):
        try:
            check_cp(st.gpus, cp, st.seq_len, chunk, st.load_balance)
        except ValueError:
            continue
        candidate = plan(m, replace(st, cp=cp))
        if candidate.total <= budget_bytes:
            return candidate
    return None
