"""Triton kernels of the fast-weight chunk scan: `chunk_scan` (trainer/ops/fastweight/__init__.py) runs them on CUDA.

The math is `chunk_scan`'s: per row, segments (the part of one (document, chunk) pair in the sequence) in order,
a (committed, pending) state pair of d x h; a segment reads `committed` (O = Z C^T) and then writes
lr V^T Z, into `committed` when its chunk closes (with the pending part), into `pending` otherwise.

Each program owns one (BLOCK_D x BLOCK_H) tile of the state of one row and keeps it on chip, in fp32, while it
walks every segment of the row: the number of launches does not depend on the number of chunks. A tile's read
is only part of a token's output (the sum over h, or over d for the gradient of Z, runs across the tiles of
other programs), so the reads are added into fp32 buffers with atomics; the order of those additions, and so
the last bits of the results, vary from run to run. Operands are cast in registers to the dot dtype (bf16
under autocast: tensor cores) and products accumulate in fp32.

Three kernels, one launch each:
- `_walk_kernel` walks forward: the forward (reads into O, the final state out) and, in the backward,
  recomputes the states to send the read's gradient to Z (gO C). Its registers hold committed and the
  segment's write; the incoming pending part is read back where it lands.
- `_reverse_kernel` walks backward with the state's gradient G (the sum of gO^T Z of the reads after a
  segment): a segment's write receives G, so gV = lr Z G^T and gZ += lr V G. Its registers hold G alone: the
  segment's reads accumulate into it directly while the write uses the bf16 snapshot taken at its start.

Register pressure decides the tiles (the per-kernel defaults below spill little or nothing on sm_90: read off
the cubin, which `triton.compile` builds for sm_90 without a GPU). The atomics are scalar fp32 reductions.

Tested under the Triton interpreter on CPU against the fp64 references (tests/test_scan_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainer.ops.fastweight.inputs import check_scan_inputs
from trainer.ops.fastweight.layout import ChunkLayout

_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

# (BLOCK_T, BLOCK_D, BLOCK_H, num_warps) per kernel. A read's partial sums are added across the tiles of the
# reduced dimension, so each kernel takes its tiles long in that dimension: the forward reduces over h, the
# gradient of Z over d. Not tuned on a GPU yet: `tools.bench.scan` times the alternatives.
FORWARD_BLOCKS = (64, 64, 128, 8)
READ_GRAD_BLOCKS = (64, 128, 64, 8)
REVERSE_BLOCKS = (64, 64, 128, 8)


def triton_chunk_scan(
    z: torch.Tensor,
    v: torch.Tensor,
    layout: ChunkLayout,
    lr: float,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`chunk_scan` on the kernels: the fast output (B, S, d) in z's dtype and the final (committed, pending)
    state, fp32 (B, d, h) each. `state`: the (committed, pending) pair the rows start from, zero if None."""
    check_scan_inputs(z, v, layout, state)
    return _TritonChunkScan.apply(z, v, *(state or (None, None)), layout.segment_table, lr)


class _TritonChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, v, committed_in, pending_in, table, lr):
        z, v = z.contiguous(), v.contiguous()
        state = None if committed_in is None else (_fp32(committed_in), _fp32(pending_in))
        dot = dot_config(z, v)
        out, committed, pending = walk(z, v, table, state, lr, dot)
        ctx.save_for_backward(z, v, *(state or ()))
        ctx.table, ctx.lr, ctx.dot = table, lr, dot
        ctx.state_dtypes = None if state is None else (committed_in.dtype, pending_in.dtype)
        return out.to(z.dtype), committed, pending

    @staticmethod
    def backward(ctx, grad_out, grad_committed, grad_pending):
        z, v, *state = ctx.saved_tensors
        state = tuple(state) or None
        grad_out = grad_out.contiguous()
        grad_z = walk(z, v, ctx.table, state, ctx.lr, ctx.dot, grad_out=grad_out)
        grad_state = (_fp32(grad_committed), _fp32(grad_pending))
        grad_v, (grad_committed_in, grad_pending_in) = reverse(
            z, v, grad_out, ctx.table, grad_state, ctx.lr, ctx.dot, grad_z
        )
        if state is None:
            grad_committed_in = grad_pending_in = None
        else:
            grad_committed_in = grad_committed_in.to(ctx.state_dtypes[0])
            grad_pending_in = grad_pending_in.to(ctx.state_dtypes[1])
        return grad_z.to(z.dtype), grad_v.to(v.dtype), grad_committed_in, grad_pending_in, None, None


def _fp32(state: torch.Tensor) -> torch.Tensor:
    return state.to(torch.float32).contiguous()


def dot_config(z: torch.Tensor, v: torch.Tensor) -> tuple:
    """(dot dtype, input precision): autocast's dtype when it is on (the cast autocast would make for a
    matmul), else the inputs' common dtype; fp32 runs as TF32 only where torch's matmuls may."""
    device = z.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(z.dtype, v.dtype)
    if dtype not in _DOT_DTYPES:
        raise TypeError(f"the Triton chunk scan takes bf16, fp16 or fp32 tensors, got {dtype}")
    precision = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return _DOT_DTYPES[dtype], precision


def _grid(batch: int, d: int, h: int, blocks: tuple) -> tuple[int, int]:
    _, block_d, block_h, _ = blocks
    return triton.cdiv(d, block_d) * triton.cdiv(h, block_h), batch


def walk(z, v, table, state, lr, dot, *, grad_out=None, blocks=None):
    """Forward walk. Without `grad_out`: the reads Z C^T (fp32, (B, S, d)) and the final (committed, pending).
    With it: the read's gradient to Z, gO C (fp32, (B, S, h)). `state` is the (committed, pending) pair the
    rows start from, fp32 (B, d, h) each, or None for zero."""
    batch, seq, h = z.shape
    d = v.shape[-1]
    table, counts, row_stride = table
    reads_grad = grad_out is not None
    blocks = blocks or (READ_GRAD_BLOCKS if reads_grad else FORWARD_BLOCKS)
    block_t, block_d, block_h, warps = blocks
    out = z.new_zeros(batch, seq, h if reads_grad else d, dtype=torch.float32)
    committed_out = None if reads_grad else z.new_empty(batch, d, h, dtype=torch.float32)
    pending_out = None if reads_grad else z.new_empty(batch, d, h, dtype=torch.float32)
    committed_in, pending_in = state if state is not None else (None, None)
    dummy = out  # pointer arguments a kernel variant does not read
    _walk_kernel[_grid(batch, d, h, blocks)](
        z, v, grad_out if reads_grad else dummy, out,
        committed_in if state is not None else dummy, pending_in if state is not None else dummy,
        committed_out if not reads_grad else dummy, pending_out if not reads_grad else dummy,
        table, counts, row_stride, table.shape[1], seq, d, h, lr, *dot,
        HAS_STATE=state is not None, READ_GRAD=reads_grad,
        BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    return out if reads_grad else (out, committed_out, pending_out)


def reverse(z, v, grad_out, table, grad_state, lr, dot, grad_z, *, blocks=None):
    """Backward walk: adds the writes' gradient to Z into `grad_z` (fp32, (B, S, h)); returns the gradient of V
    (fp32, (B, S, d)) and that of the starting (committed, pending) state. `grad_state` holds the gradients of
    the final (committed, pending), fp32 (B, d, h) each."""
    batch, seq, h = z.shape
    d = v.shape[-1]
    table, counts, row_stride = table
    blocks = blocks or REVERSE_BLOCKS
    block_t, block_d, block_h, warps = blocks
    grad_v = z.new_zeros(batch, seq, d, dtype=torch.float32)
    grad_committed, grad_pending = (g.clone() for g in grad_state)  # walked in place into the inputs' gradients
    _reverse_kernel[_grid(batch, d, h, blocks)](
        z, v, grad_out, grad_z, grad_v, grad_committed, grad_pending,
        table, counts, row_stride, table.shape[1], seq, d, h, lr, *dot,
        BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    return grad_v, (grad_committed, grad_pending)


@triton.jit
def _tile_coordinates(D, H, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's row and state tile: d and h indices, their masks, and the tile's offsets in a (B, d, h)
    state, as the row's first element (64-bit) and int32 offsets from it."""
    tile, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    tiles_h = tl.cdiv(H, BLOCK_H)
    ds = (tile // tiles_h) * BLOCK_D + tl.arange(0, BLOCK_D)
    hs = (tile % tiles_h) * BLOCK_H + tl.arange(0, BLOCK_H)
    d_ok, h_ok = ds < D, hs < H
    state_offsets = ds[:, None] * H + hs[None, :]
    return row, ds, hs, d_ok, h_ok, row * D * H, state_offsets, d_ok[:, None] & h_ok[None, :]


@triton.jit
def _segment(table_ptr, row, row_stride, width, k):
    """Segment k of the row's plan: start, end, resets, closes."""
    entry = table_ptr + (row * row_stride * width + k) * 3
    flags = tl.load(entry + 2)
    return tl.load(entry), tl.load(entry + 1), (flags & 1) != 0, (flags & 2) != 0


@triton.jit
def _block(ptr, row, t0, end, cols, col_ok, S, width, BLOCK_T: tl.constexpr):
    """Pointers and mask of rows [t0, t0 + BLOCK_T) (those before `end`), columns `cols`, of one (S, width) slab
    of a (B, S, width) tensor: the block's first row in 64-bit arithmetic, int32 offsets within the block (fewer
    registers than a tile of 64-bit offsets)."""
    rows = tl.arange(0, BLOCK_T)
    pointers = ptr + (row * S + t0) * width + (rows[:, None] * width + cols[None, :])
    return pointers, ((t0 + rows) < end)[:, None] & col_ok[None, :]


@triton.jit
def _load_block(ptr, row, t0, end, cols, col_ok, S, width, BLOCK_T: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """A block of rows (see `_block`), cast to the dot dtype."""
    pointers, mask = _block(ptr, row, t0, end, cols, col_ok, S, width, BLOCK_T)
    return tl.load(pointers, mask=mask, other=0.0).to(DOT_DTYPE)


@triton.jit
def _add_block(ptr, row, t0, end, cols, col_ok, S, width, part, BLOCK_T: tl.constexpr):
    """Add `part` into a block of rows (see `_block`) of an fp32 tensor that other programs add into too."""
    pointers, mask = _block(ptr, row, t0, end, cols, col_ok, S, width, BLOCK_T)
    tl.atomic_add(pointers, part, mask=mask, sem="relaxed")


@triton.jit
def _walk_kernel(
    z_ptr, v_ptr, grad_out_ptr, out_ptr, committed_in_ptr, pending_in_ptr, committed_out_ptr, pending_out_ptr,
    table_ptr, counts_ptr, row_stride, width, S, D, H, lr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, HAS_STATE: tl.constexpr, READ_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    row, ds, hs, d_ok, h_ok, state_base, state_offsets, state_ok = _tile_coordinates(D, H, BLOCK_D, BLOCK_H)
    committed_in_ptr, pending_in_ptr = committed_in_ptr + state_base, pending_in_ptr + state_base  # this row's
    committed_out_ptr, pending_out_ptr = committed_out_ptr + state_base, pending_out_ptr + state_base
    if HAS_STATE:
        committed = tl.load(committed_in_ptr + state_offsets, mask=state_ok, other=0.0)
    else:
        committed = tl.zeros([BLOCK_D, BLOCK_H], dtype=tl.float32)
    # Two fp32 tiles live in registers, committed and the segment's write: the incoming pending part is read
    # back where it lands (the first segment's write), and only the last segment's write can stay pending.
    owed = tl.full([], HAS_STATE, tl.int1)  # the incoming pending part is not written anywhere yet
    live = tl.full([], HAS_STATE, tl.int1)  # committed may be non-zero: reading it is not a no-op
    write = tl.zeros([BLOCK_D, BLOCK_H], dtype=tl.float32)
    closes = tl.full([], True, tl.int1)
    for k in range(tl.load(counts_ptr + row * row_stride)):
        start, end, resets, closes = _segment(table_ptr, row, row_stride, width, k)
        committed = tl.where(resets, 0.0, committed)
        owed = owed & ~resets
        live = live & ~resets
        reading = committed.to(DOT_DTYPE)
        write = tl.zeros([BLOCK_D, BLOCK_H], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            z = _load_block(z_ptr, row, t0, end, hs, h_ok, S, H, BLOCK_T, DOT_DTYPE)
            v = _load_block(v_ptr, row, t0, end, ds, d_ok, S, D, BLOCK_T, DOT_DTYPE)
            if live:
                if READ_GRAD:  # d(gO . Z C^T)/dZ = gO C, summed over this tile's d
                    grad_out = _load_block(grad_out_ptr, row, t0, end, ds, d_ok, S, D, BLOCK_T, DOT_DTYPE)
                    part = tl.dot(grad_out, reading, input_precision=PRECISION)
                    _add_block(out_ptr, row, t0, end, hs, h_ok, S, H, part, BLOCK_T)
                else:  # Z C^T, summed over this tile's h
                    part = tl.dot(z, tl.trans(reading), input_precision=PRECISION)
                    _add_block(out_ptr, row, t0, end, ds, d_ok, S, D, part, BLOCK_T)
            write = tl.dot(tl.trans(v), z, write, input_precision=PRECISION)
        write = lr * write
        if HAS_STATE:
            write += tl.load(pending_in_ptr + state_offsets, mask=tl.where(owed, state_ok, False), other=0.0)
            owed = owed & False
        committed = tl.where(closes, committed + write, committed)
        live = live | closes
    if not READ_GRAD:
        tl.store(committed_out_ptr + state_offsets, committed, mask=state_ok)
        tl.store(pending_out_ptr + state_offsets, tl.where(closes, 0.0, write), mask=state_ok)


@triton.jit
def _reverse_kernel(
    z_ptr, v_ptr, grad_out_ptr, grad_z_ptr, grad_v_ptr, grad_committed_ptr, grad_pending_ptr,
    table_ptr, counts_ptr, row_stride, width, S, D, H, lr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    row, ds, hs, d_ok, h_ok, state_base, state_offsets, state_ok = _tile_coordinates(D, H, BLOCK_D, BLOCK_H)
    grad_committed_ptr, grad_pending_ptr = grad_committed_ptr + state_base, grad_pending_ptr + state_base  # this row's
    # One fp32 tile lives in registers: the gradient of committed, into which each segment's reads (gO^T Z)
    # accumulate directly; the segment's write receives the bf16 snapshot taken at its start.
    grad_committed = tl.load(grad_committed_ptr + state_offsets, mask=state_ok, other=0.0)
    count = tl.load(counts_ptr + row * row_stride)
    for j in range(count):
        k = count - 1 - j
        start, end, resets, closes = _segment(table_ptr, row, row_stride, width, k)
        # What this segment writes lands in committed when its chunk closes here; else (only the last segment)
        # it stays pending, whose gradient is given.
        grad_pending = tl.load(grad_pending_ptr + state_offsets, mask=tl.where(closes, False, state_ok), other=0.0)
        grad_write = tl.where(closes, grad_committed, grad_pending)
        if k == 0:  # the incoming pending part lands with the first segment's write
            tl.store(grad_pending_ptr + state_offsets, tl.where(resets, 0.0, grad_write), mask=state_ok)
        writing = (lr * grad_write).to(DOT_DTYPE)
        for t0 in range(start, end, BLOCK_T):
            z = _load_block(z_ptr, row, t0, end, hs, h_ok, S, H, BLOCK_T, DOT_DTYPE)
            v = _load_block(v_ptr, row, t0, end, ds, d_ok, S, D, BLOCK_T, DOT_DTYPE)
            grad_out = _load_block(grad_out_ptr, row, t0, end, ds, d_ok, S, D, BLOCK_T, DOT_DTYPE)
            part_v = tl.dot(z, tl.trans(writing), input_precision=PRECISION)
            _add_block(grad_v_ptr, row, t0, end, ds, d_ok, S, D, part_v, BLOCK_T)
            part_z = tl.dot(v, writing, input_precision=PRECISION)
            _add_block(grad_z_ptr, row, t0, end, hs, h_ok, S, H, part_z, BLOCK_T)
            grad_committed = tl.dot(tl.trans(grad_out), z, grad_committed, input_precision=PRECISION)  # its reads
        grad_committed = tl.where(resets, 0.0, grad_committed)
    tl.store(grad_committed_ptr + state_offsets, grad_committed, mask=state_ok)
