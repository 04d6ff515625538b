"""`FastWeightMLP`: a gated MLP whose down-projection is a fast weight written chunk by chunk."""

from __future__ import annotations

import torch
from torch import nn

from trainer.ttt.config import TTTConfig
from trainer.ttt.context import TTTContext
from trainer.ttt.fastweight import chunk_scan
from trainer.ttt.layout import single_document_layout
from trainer.ttt.targets import value_targets


class FastWeightMLP(nn.Module):
    """Takes over a gated MLP's `gate_proj`, `up_proj`, `down_proj` (same parameters, same state-dict
    keys) and adds `ttt_conv` ("inplace") and `ttt_proj` (when `cfg.proj`), initialised so V = 0:
    a freshly patched model computes exactly what the base model computes.

    Called as `mlp(x)` inside a patched model, it reads the document/chunk layout of the current
    forward from the shared `TTTContext`; called on its own, each row of x is one document.
    """

    def __init__(self, mlp: nn.Module, cfg: TTTConfig, context: TTTContext):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.cfg = cfg
        self._context = context
        hidden = self.down_proj.out_features
        factory = {"device": self.down_proj.weight.device, "dtype": self.down_proj.weight.dtype}
        if cfg.method == "inplace":
            k = cfg.conv_kernel
            self.ttt_conv = nn.Conv1d(hidden, hidden, k, padding=k // 2, groups=hidden, bias=False, **factory)
            nn.init.zeros_(self.ttt_conv.weight)
        if cfg.proj:
            self.ttt_proj = nn.Linear(hidden, hidden, bias=False, **factory)
            # inplace: the zero conv already gives V = 0, so P starts as the identity;
            # ntp / recon: P is the only parameter of the target, so it starts at zero.
            (nn.init.eye_ if cfg.method == "inplace" else nn.init.zeros_)(self.ttt_proj.weight)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d). `source` overrides the value-target source T (e.g. embeddings)."""
        z = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        out = self.down_proj(z)
        layout = self._context.layout or single_document_layout(x.shape[0], x.shape[1], self.cfg.chunk_size, x.device)
        if source is None:
            source = x if self.cfg.target_source == "hidden" else self._context.embeddings
        if source is None:
            raise ValueError("ttt.target_source=embed needs token embeddings: call the patched model or pass source=")
        conv = self.ttt_conv.weight if self.cfg.method == "inplace" else None
        proj = self.ttt_proj.weight if self.cfg.proj else None
        values = value_targets(self.cfg.method, source.to(z.dtype), layout, conv, proj)
        clip = None if self.training else self.cfg.clip
        fast, _ = chunk_scan(z, values, layout, self.cfg.lr, clip=clip)
        return out + fast

    def extra_repr(self) -> str:
        return f"method={self.cfg.method}, chunk_size={self.cfg.chunk_size}, lr={self.cfg.lr}"
