"""Triton kernels for the linear cross-entropy, kept for comparison: the trainer no longer runs them.

On one H200 at 32768 tokens x d=1024 x vocab 151936 in bf16 they take 261 ms forward+backward (the backward
234 ms, bound by its atomics), liger-kernel's fused linear cross-entropy 73 ms, so `linear_cross_entropy`
(trainer/kernels/loss.py) runs liger's on CUDA. `python -m tools.bench_loss` measures both side by side
with cut-cross-entropy; this module goes if they lose there too.

The (tokens x vocab) logits are never written to memory. The forward kernel gives each program one block of
token rows; it walks the vocabulary tile by tile, computes each logits tile with `tl.dot` (fp32 accumulation),
and keeps an online logsumexp and the target logit, so it stores only the per-row loss and lse. The backward
kernel gives each program one (row block, vocab tile) pair: it recomputes the logits tile, turns it into the
gradient of the logits, `(softmax - onehot(label)) * grad`, and adds that tile's share of grad_hidden and
grad_weight to fp32 buffers with `tl.atomic_add` (so the summation order, and the last bits of the gradients,
vary between runs).

Operands are multiplied in the dtype of `hidden` and `weight` promoted together: bf16 x bf16 runs on bf16
tensor cores (the gradient-of-logits tile is rounded to bf16 for its two products, as in other fused
cross-entropies), anything involving fp32 runs in fp32, as TF32 only where `torch.backends.cuda.matmul.allow_tf32`
permits it, like the torch path's matmuls. fp64 stays on the torch path.

Tested against `naive_linear_cross_entropy` under the Triton interpreter on CPU (tests/test_loss_triton.py).
The block sizes below were not tuned. The backward makes N*d*(V/BLOCK_V) + V*d*(N/BLOCK_N) fp32 atomic adds,
about one per 6*BLOCK_N*BLOCK_V/(BLOCK_N+BLOCK_V) flops, which is what bounds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parallel.sharding import IGNORE_INDEX
from trainer.kernels.loss import naive_linear_cross_entropy  # the reference the kernels are tested against

__all__ = ["naive_linear_cross_entropy", "triton_linear_cross_entropy"]

_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def triton_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    block_n: int = 64,
    block_v: int = 128,
    block_d: int = 64,
    num_warps: int = 8,
) -> torch.Tensor:
    """Sum over tokens of CE(hidden @ weight^T, labels), ignoring IGNORE_INDEX; hidden (N, d), weight (V, d).

    Block sizes are powers of two >= 16 (a `tl.dot` constraint); shapes need not be multiples of them.
    """
    blocks = (block_n, block_v, block_d, num_warps)
    return _TritonLinearCrossEntropy.apply(hidden, weight, labels, blocks)


class _TritonLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, blocks):
        hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
        (n, d), v = hidden.shape, weight.shape[0]
        block_n, block_v, block_d, num_warps = blocks
        loss = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        _forward_kernel[(triton.cdiv(n, block_n),)](
            hidden, weight, labels, loss, lse, n, v, d, IGNORE_INDEX, *_dot_config(hidden, weight),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.blocks = blocks
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels, lse = ctx.saved_tensors
        (n, d), v = hidden.shape, weight.shape[0]
        block_n, block_v, block_d, num_warps = ctx.blocks
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros(n if want_h else 0, d, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(v if want_w else 0, d, dtype=torch.float32, device=hidden.device)
        grad_total = grad_total.to(torch.float32).contiguous()
        _backward_kernel[(triton.cdiv(n, block_n), triton.cdiv(v, block_v))](
            hidden, weight, labels, lse, grad_total, grad_hidden, grad_weight, n, v, d, IGNORE_INDEX,
            *_dot_config(hidden, weight), WANT_GRAD_HIDDEN=want_h, WANT_GRAD_WEIGHT=want_w,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
        grad_hidden = grad_hidden.to(hidden.dtype) if want_h else None
        grad_weight = grad_weight.to(weight.dtype) if want_w else None
        return grad_hidden, grad_weight, None, None


def _dot_config(hidden: torch.Tensor, weight: torch.Tensor) -> tuple:
    """(operand dtype, input precision) of the kernels' `tl.dot`s."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if dtype not in _DOT_DTYPES:
        raise TypeError(f"triton_linear_cross_entropy takes bf16, fp16 or fp32 tensors, got {dtype}")
    precision = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return _DOT_DTYPES[dtype], precision


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, rows, row_ok, cols, col_ok, D,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """hidden[rows] @ weight[cols]^T in fp32; padding rows and columns hold 0."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        h = tl.load(h_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * D + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), w_t.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, labels_ptr, loss_ptr, lse_ptr, N, V, D, ignore_index,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    running_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    target = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        logits = _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, D, DOT_DTYPE, PRECISION, BLOCK_N, BLOCK_V,
                              BLOCK_D)  # fmt: skip
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))  # finite: every tile has a real column
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, tl.where(labels != ignore_index, lse - target, 0.0), mask=row_ok)


@triton.jit
def _backward_kernel(
    h_ptr, w_ptr, labels_ptr, lse_ptr, grad_ptr, grad_h_ptr, grad_w_ptr, N, V, D, ignore_index,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, WANT_GRAD_HIDDEN: tl.constexpr, WANT_GRAD_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < N, cols < V
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    logits = _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, D, DOT_DTYPE, PRECISION, BLOCK_N, BLOCK_V,
                          BLOCK_D)  # fmt: skip
    grad = tl.exp(logits - lse[:, None]) - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    keep = (labels != ignore_index)[:, None] & col_ok[None, :]
    grad = tl.where(keep, grad * tl.load(grad_ptr), 0.0).to(DOT_DTYPE)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        if WANT_GRAD_HIDDEN:
            w = tl.load(w_ptr + cols[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            part = tl.dot(grad, w.to(DOT_DTYPE), input_precision=PRECISION)
            tl.atomic_add(grad_h_ptr + rows[:, None] * D + ks[None, :], part, mask=row_ok[:, None] & k_ok[None, :],
                          sem="relaxed")  # fmt: skip
        if WANT_GRAD_WEIGHT:
            h = tl.load(h_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            part = tl.dot(tl.trans(grad), h.to(DOT_DTYPE), input_precision=PRECISION)
            tl.atomic_add(grad_w_ptr + cols[:, None] * D + ks[None, :], part, mask=col_ok[:, None] & k_ok[None, :],
                          sem="relaxed")  # fmt: skip
