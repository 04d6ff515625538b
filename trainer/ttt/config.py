"""`TTTConfig`: which MLP blocks become fast-weight MLPs, and how they write.

Validated once, at construction: every bad value raises a one-line `ValueError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

METHODS = ("none", "inplace", "ntp", "recon", "nomem")
WRITES = ("raw", "normalized")  # see trainer/ops/fastweight/
TARGET_SOURCES = ("hidden", "embed")

_EVERY_RULE = re.compile(r"^every:(\d+)(?::(\d+))?$")


@dataclass(frozen=True)
class TTTConfig:
    """Fast-weight MLP settings (see DESIGN.md, "The fast-weight MLP").

    method:        "none" | "inplace" (conv target) | "ntp" (next-position target) | "recon" (ablation) |
                   "nomem" (the control without memory: ntp's parameters, each token reads only its own value).
    layers:        explicit decoder-layer indices, "all", or an every-k rule "every:K" / "every:K:OFFSET"
                   (layers i with i % K == OFFSET, OFFSET defaults to K - 1 so the last layer of each
                   group of K is a TTT layer).
    chunk_size:    C, positions per fast-weight write.
    lr:            eta: the raw write's dW_c = eta * V_c^T Z_c; the normalized read's gain (|O| <= eta max |V|).
    conv_kernel:   k of the depthwise target conv ("inplace"); odd, so the conv is centered.
    proj:          learn the d x d target projection P (`ttt_proj`). Required by "ntp", "recon" and "nomem".
    target_source: T, the value-target source: the MLP input ("hidden") or token embeddings ("embed").
    clip:          tau; at inference a chunk delta with Frobenius norm above tau is scaled to tau.
    write:         "normalized" (unit-norm keys, a learned per-token write gate, each chunk reads the gated mean
                   of the writes before it: the same scale for any model and length) | "raw" (the In-Place TTT
                   release's dW_c = eta V_c^T Z_c).
    gate_bias:     b, the write gate's initial bias ("normalized"): g = sigmoid(x . w + b) starts at sigmoid(b) for
                   every token, so the first read is the plain mean whatever b is; a negative b makes the gate
                   log-linear (g ~ exp(x . w + b)), a softmax-like selection of the few tokens that write.
    """

    method: str = "inplace"
    layers: Sequence[int] | str = "all"
    chunk_size: int = 512
    lr: float = 1.0
    conv_kernel: int = 5
    proj: bool = True
    target_source: str = "hidden"
    clip: float | None = None
    write: str = "normalized"
    gate_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"ttt.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise ValueError(f"ttt.chunk_size must be a positive integer, got {self.chunk_size!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ValueError(f"ttt.lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.conv_kernel, int) or self.conv_kernel <= 0 or self.conv_kernel % 2 == 0:
            raise ValueError(f"ttt.conv_kernel must be a positive odd integer, got {self.conv_kernel!r}")
        if self.target_source not in TARGET_SOURCES:
            raise ValueError(
                f"ttt.target_source must be one of {', '.join(TARGET_SOURCES)}, got {self.target_source!r}"
            )
        if self.write not in WRITES:
            raise ValueError(f"ttt.write must be one of {', '.join(WRITES)}, got {self.write!r}")
        if (
            isinstance(self.gate_bias, bool)
            or not isinstance(self.gate_bias, (int, float))
            or not math.isfinite(self.gate_bias)
        ):
            raise ValueError(f"ttt.gate_bias must be a finite number, got {self.gate_bias!r}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"ttt.clip must be positive or None, got {self.clip!r}")
        if self.method in ("ntp", "recon", "nomem") and not self.proj:
            raise ValueError(
                f"ttt.method={self.method} needs ttt.proj=true: its target has no other parameter to start at zero"
            )
        _parse_layers(self.layers)  # fail early on a malformed rule

    def layer_indices(self, num_layers: int) -> list[int]:
        """The decoder-layer indices to patch in a model of `num_layers` layers."""
        if self.method == "none":
            return []
        spec = _parse_layers(self.layers)
        if isinstance(spec, tuple):
            every, offset = spec
            return [i for i in range(num_layers) if i % every == offset]
        bad = [i for i in spec if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"ttt.layers index {bad[0]} is out of range for a model with {num_layers} layers")
        return sorted(set(spec))


def _parse_layers(layers) -> list[int] | tuple[int, int]:
    """Explicit indices as a list, or an every-k rule as (k, offset)."""
    if isinstance(layers, str):
        if layers == "all":
            return (1, 0)
        match = _EVERY_RULE.match(layers)
        if not match or int(match.group(1)) == 0:
            raise ValueError(f"ttt.layers must be indices, 'all' or 'every:K[:OFFSET]', got {layers!r}")
        every = int(match.group(1))
        offset = int(match.group(2)) if match.group(2) is not None else every - 1
        if offset >= every:
            raise ValueError(f"ttt.layers offset must be below K in 'every:K:OFFSET', got {layers!r}")
        return (every, offset)
    if isinstance(layers, int) and not isinstance(layers, bool):
        return [layers]
    try:
        indices = list(layers)
    except TypeError:
        raise ValueError(f"ttt.layers must be indices, 'all' or 'every:K[:OFFSET]', got {layers!r}") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"ttt.layers indices must be integers, got {layers!r}")
    return indices
