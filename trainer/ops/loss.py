"""Cross-entropy of a linear head without materializing the (tokens x vocab) logits.

For long sequences the logits dominate activation memory (128k tokens x 152k vocab in fp32 is 80 GB).
`linear_cross_entropy` picks the path by device:
- CUDA (bf16, fp16, fp32): liger-kernel's fused linear cross-entropy. It computes both gradients during the
  forward, a block of token rows at a time (one (rows x vocab) logits block, rows ~ tokens * d / vocab), with
  the head's gradient accumulated in fp32. On one H200 at 32768 tokens x d=1024 x vocab 151936 in bf16 it
  took 73 ms forward+backward, against 261 ms for this project's own Triton kernels (whose atomics-bound
  backward alone took 234 ms: removed); `python -m tools.bench.loss` measures liger beside cut-cross-entropy
  and the torch path.
- CPU and fp64: the chunked torch path below, which computes the loss chunk by chunk of tokens and recomputes
  each chunk's logits in the backward, so it holds one (chunk x vocab) block at a time (liger keeps its
  per-token loss in fp32, too coarse for the fp64 exactness tests).
`naive_linear_cross_entropy` is the plain reference every path is tested against.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from parallel.sharding import IGNORE_INDEX


def naive_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(acc) @ weight.to(acc).T
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Sum over tokens of CE(hidden @ weight^T, labels), ignoring IGNORE_INDEX; hidden (N, d), weight (V, d).

    CUDA tensors in bf16, fp16 or fp32 go to liger-kernel where it is installed (it ignores `chunk_size`), both
    cast to their promoted dtype; the rest, CPU and fp64, to the chunked torch path. Under autocast the inputs
    are cast to its dtype first, as the `nn.Linear` head this replaces would be (fp32 master weights would
    otherwise run the head in fp32); either path computes the loss itself in fp32.
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the cast autocast makes; then the loss's own precision, in fp32
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return linear_cross_entropy(hidden.to(dtype), weight.to(dtype), labels, chunk_size)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if hidden.is_cuda and dtype in _FUSED_DTYPES and _liger_available():
        return _liger_linear_cross_entropy(hidden.to(dtype), weight.to(dtype), labels)
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size)


@torch.no_grad()
def token_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Per token CE(hidden @ weight^T, labels), (N,) in at least fp32, 0 where the label is ignored: the evaluation's
    loss by position, a chunk of token rows at a time (one (chunk x vocab) logits block held). No gradient."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    acc = torch.promote_types(dtype, torch.float32)
    w = weight.to(dtype).to(acc)
    out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        logits = hidden[rows].to(dtype).to(acc) @ w.T
        out[rows] = F.cross_entropy(logits, labels[rows], ignore_index=IGNORE_INDEX, reduction="none")
    return out


_FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def _liger_available() -> bool:
    """liger-kernel is a dependency on Linux only (as triton, which it runs on); elsewhere CUDA takes the torch path."""
    return importlib.util.find_spec("liger_kernel") is not None


def _liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy; hidden and weight share a dtype (its matmuls need one)."""
    # late: CPU runs never import liger (nor triton through it)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if weight.requires_grad and not hidden.requires_grad and torch.is_grad_enabled():
        # liger (0.8.5) computes the head's gradient only beside the hidden states': a frozen trunk under a
        # trainable head would silently get none.
        hidden = hidden.detach().requires_grad_()
    return liger_fused_linear_cross_entropy(
        hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum", accum_dtype=torch.float32
    )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 models compute the loss in fp32
        w = weight.to(acc)
        total = hidden.new_zeros((), dtype=acc)
        lse = hidden.new_empty(hidden.shape[0], dtype=acc)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = hidden[rows].to(acc) @ w.T
            lse[rows] = torch.logsumexp(logits, dim=-1)
            target = labels[rows]
            valid = target != IGNORE_INDEX
            picked = logits.gather(1, target.clamp_min(0)[:, None])[:, 0]
            total += ((lse[rows] - picked) * valid).sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels, lse = ctx.saved_tensors
        w = weight.to(lse.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(w)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows].to(lse.dtype)
            target = labels[rows]
            valid = (target != IGNORE_INDEX).to(lse.dtype)[:, None]
            grad_logits = torch.exp(h @ w.T - lse[rows, None])  # softmax, recomputed
            grad_logits.scatter_add_(1, target.clamp_min(0)[:, None], -torch.ones_like(valid))
            grad_logits *= valid * grad_total
            grad_hidden[rows] = (grad_logits @ w).to(hidden.dtype)
            grad_weight.addmm_(grad_logits.T, h)
        return grad_hidden, grad_weight.to(weight.dtype), None, None
