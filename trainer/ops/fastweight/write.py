"""What the fast-weight writes and reads share: the keys, the normalized read's division, the accumulation dtype
and the inference clip (see `trainer/ops/fastweight/__init__.py` for the math)."""

from __future__ import annotations

import torch

KEY_EPS = 1e-6  # a zero activation row gets a zero key, not a division by zero
MASS_EPS = 1e-30  # only guards the division where nothing was read (mass 0, fast 0)


def write_keys(z: torch.Tensor, write: str) -> torch.Tensor:
    """The keys the fast weight is written and read with: Z itself (raw) or Z / ||Z|| per token (normalized),
    in Z's dtype (autocast computes the norm in fp32; the scan's products take bf16 operands anyway)."""
    if write == "raw":
        return z
    return torch.nn.functional.normalize(z, dim=-1, eps=KEY_EPS).to(z.dtype)


def gated_mean(fast: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """The normalized read: the gated write sum `fast` (B, S, d) over the gate mass `mass` (B, S, 1) of the
    positions it read; 0 where a token reads nothing (a document's first chunk)."""
    return torch.where(mass > 0, fast / mass.clamp_min(MASS_EPS), 0)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """States accumulate in at least fp32; fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def clip_delta(delta: torch.Tensor, tau: float) -> torch.Tensor:
    """Scale each (d x h) delta whose Frobenius norm exceeds tau down to norm tau."""
    norm = torch.linalg.matrix_norm(delta, keepdim=True)
    return delta * torch.clamp(tau / norm.clamp_min(torch.finfo(delta.dtype).tiny), max=1.0)
