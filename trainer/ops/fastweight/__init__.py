"""The fast-weight write/read of a TTT MLP: a memory-lean chunk scan and its references.

With Z (S x h) the gated MLP activations and V (S x d) the value targets, chunk c of a document reads
the writes of strictly earlier chunks of the same document:

    dW_c = lr * V_c^T Z_c                       (d x h)
    O_c  = Z_c (sum_{c' < c} dW_c')^T           (the fast part; the caller adds Z_c W_0^T)

The op in one folder, flash-linear-attention's style, each path beside the reference it must equal:

    naive.py         `naive_fastweight` (the prefix sum, every chunk's weight materialized) and
                     `naive_normalized_fastweight` (the token-pair sum): the references
    chunk.py         the torch chunk scan (CPU; O(1) d x h states per row, a recomputing backward)
    chunk_triton.py  the same scan as three Triton kernels (CUDA; CPU under TRITON_INTERPRET=1)
    layout.py        where documents, chunks and segments start in a packed batch
    write.py         keys, the normalized read's division, the accumulation dtype, the clip

`chunk_scan` below is the one entry point: it checks its inputs and picks the path.

The state is a pair (committed, pending): `committed` holds the writes of finished chunks, `pending`
the partial write of a chunk that is still open at the end of the sequence. Under context
parallelism a chunk can straddle two ranks: the next rank reads `committed` for the rest of that
chunk and adds `pending` into the write when the chunk closes.

Two writes share the scan (`TTTConfig.write`):

    raw          the In-Place TTT release's formula above: keys K = Z. Its gain lr * sum_s (Z_t . Z_s) grows
                 with the activations' scale and with the number of tokens written.
    normalized   keys K_t = Z_t / ||Z_t|| (unit L2 norm per token), each token writes with a learned weight
                 g_s = sigmoid(x_s . w + b) in (0, 1), and chunk c reads the g-weighted mean of what the
                 positions of earlier chunks wrote:
                     O_t = lr * sum_{s in chunks < c} g_s (K_t . K_s) V_s / sum_{s in chunks < c} g_s
                 Every weight K_t . K_s lies in [-1, 1], so |O_t| <= lr * max_s |V_s| at any activation scale
                 and length. With w = b = 0 (the drop-in init) every g is 1/2 and this is the plain mean; the
                 gate lets a layer write only the tokens worth remembering, so a few associations are not
                 diluted by the thousands of tokens around them.

The normalized write is two scans of the same kind (the state stays a plain sum, so CP's state passing and
decoding are unchanged): the gated values g V with the unit keys, and the gate mass g with a key of 1;
`gated_mean` divides one by the other. `naive_normalized_fastweight` is its reference, written as the
token-pair sum.
"""

from __future__ import annotations

import os

import torch

from trainer.ops.fastweight.chunk import chunk_sum, read_incoming_state, state_transfer, torch_chunk_scan
from trainer.ops.fastweight.inputs import check_scan_inputs
from trainer.ops.fastweight.layout import ChunkLayout, build_layout, single_document_layout
from trainer.ops.fastweight.naive import naive_fastweight, naive_normalized_fastweight
from trainer.ops.fastweight.write import accumulation_dtype, clip_delta, gated_mean, write_keys

__all__ = [
    "ChunkLayout", "accumulation_dtype", "build_layout", "check_scan_inputs", "chunk_scan", "chunk_sum", "clip_delta",
    "gated_mean", "naive_fastweight", "naive_normalized_fastweight", "read_incoming_state", "single_document_layout",
    "state_transfer", "write_keys",
]  # fmt: skip

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def chunk_scan(
    z: torch.Tensor,
    v: torch.Tensor,
    layout: ChunkLayout,
    lr: float,
    clip: float | None = None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Fast part of the TTT MLP output, (B, S, d) in z's dtype, and the final (committed, pending) state.

    `state` is the (committed, pending) pair the sequence starts from, each (B, d, h); zero if None. Inputs that do
    not fit each other are one ValueError on either path, before any kernel runs (`check_scan_inputs`).
    CUDA tensors in bf16, fp16 or fp32 run the Triton kernels of chunk_triton.py (clip, an
    inference option whose norm spans the whole state, excepted); the rest the torch loop of chunk.py.
    """
    if _runs_triton(z, v, clip):
        from trainer.ops.fastweight.chunk_triton import triton_chunk_scan  # late: CPU runs never load triton

        out, committed, pending = triton_chunk_scan(z, v, layout, lr, state)
    else:
        out, committed, pending = torch_chunk_scan(z, v, layout, lr, clip, state)
    return out, (committed, pending)


def _runs_triton(z: torch.Tensor, v: torch.Tensor, clip: float | None) -> bool:
    """CUDA tensors take the kernels; so do CPU tensors under the Triton interpreter (TRITON_INTERPRET=1),
    which is how the tests run them on a machine without a GPU."""
    device_ok = z.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return device_ok and clip is None and torch.promote_types(z.dtype, v.dtype) in _TRITON_DTYPES
