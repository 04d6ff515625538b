"""`FastWeightMLP`: a gated MLP whose down-projection is a fast weight written chunk by chunk."""

from __future__ import annotations

import torch
from torch import nn

from parallel.halo import halo_rows
from parallel.pieces import as_cp_group
from parallel.state_scan import exclusive_state_scan, state_scan_in_flight
from trainer.ops.fastweight import (
    chunk_scan,
    chunk_sum,
    gated_mean,
    read_incoming_state,
    state_transfer,
    write_keys,
)
from trainer.ops.fastweight.layout import single_document_layout
from trainer.ttt.config import TTTConfig
from trainer.ttt.context import TTTContext
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
        self.update_norm = torch.zeros(())  # of the last forward; see _update_norm
        hidden = self.down_proj.out_features
        factory = {"device": self.down_proj.weight.device, "dtype": self.down_proj.weight.dtype}
        if cfg.method == "inplace":
            k = cfg.conv_kernel
            self.ttt_conv = nn.Conv1d(hidden, hidden, k, padding=k // 2, groups=hidden, bias=False, **factory)
        if cfg.proj:
            self.ttt_proj = nn.Linear(hidden, hidden, bias=False, **factory)
        if cfg.write == "normalized":  # the per-token write weight g = sigmoid(x . w + b)
            self.ttt_gate = nn.Linear(hidden, 1, **factory)
        self.reset_ttt_parameters()

    @torch.no_grad()
    def reset_ttt_parameters(self) -> None:
        """The initialisation that makes V = 0 (also called after a meta-device model is allocated)."""
        if self.cfg.method == "inplace":
            nn.init.zeros_(self.ttt_conv.weight)
            if self.cfg.proj:  # the conv starts as the shift to the next token, the alignment it is there for
                self.ttt_conv.weight[:, 0, self.cfg.conv_kernel // 2 + 1] = 1
        if self.cfg.proj:  # P is the last factor of every target: at zero, V = 0
            nn.init.zeros_(self.ttt_proj.weight)
        if self.cfg.write == "normalized":  # every token writes alike (g = sigmoid(b)): the plain mean to start from
            nn.init.zeros_(self.ttt_gate.weight)
            nn.init.constant_(self.ttt_gate.bias, self.cfg.gate_bias)

    def set_context_parallel(self, group) -> None:
        """Called by `parallel.apply_cp`: this model now sees one shard of each sequence."""
        if self.cfg.clip is not None:
            raise ValueError("ttt.clip (an inference option) is not supported with context parallelism")
        self._context.cp_group = group

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d). `source` overrides the value-target source T (e.g. embeddings)."""
        z = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        out = self.down_proj(z)
        context = self._context
        if source is None:
            source = x if self.cfg.target_source == "hidden" else context.embeddings
        if source is None:
            raise ValueError("ttt.target_source=embed needs token embeddings: call the patched model or pass source=")
        source = source.to(z.dtype)
        gates = torch.sigmoid(self.ttt_gate(x)).to(z.dtype) if self.cfg.write == "normalized" else None
        if self.cfg.method == "nomem":  # the control: the same parameters, no memory, no future token
            return out + self._own_value(source, gates)
        clip = None if self.training else self.cfg.clip
        keys = write_keys(z, self.cfg.write)
        if context.decoding is not None:  # incremental decoding: this layer's fast weight lives in the cache
            state = context.decoding.fast_weight_state(self)
            return out + state.extend(keys, source, gates, self._values, clip)
        if context.layout is None:  # called on its own: each row is one document
            layout = target_layout = single_document_layout(x.shape[0], x.shape[1], self.cfg.chunk_size, x.device)
        else:
            layout, target_layout = context.layout, context.target_layout
        values = self._values(source, target_layout)
        if gates is None:
            fast, committed = self._read_writes(keys, values, layout, self.cfg.lr, clip)
            self.update_norm = torch.linalg.matrix_norm(committed.detach()).mean()
            return out + fast
        fast, committed = self._read_writes(keys, gates * values, layout, self.cfg.lr, clip)
        mass, committed_mass = self._read_writes(torch.ones_like(gates), gates, layout, 1.0, scan=chunk_sum)
        norm = torch.linalg.matrix_norm(committed.detach())
        self.update_norm = gated_mean(norm, committed_mass.detach().flatten()).mean()  # of the mean a later token reads
        return out + gated_mean(fast, mass)

    @torch.compiler.disable  # host-side segment plan and custom scan kernels: run eagerly, never guarded per batch
    def _read_writes(self, keys, values, layout, lr, clip=None, scan=None):
        """What each token reads of the writes (keys, values) of earlier chunks of its document, and the
        state committed at the end of this sequence (of this shard, under CP: for metrics). `scan(values,
        layout)` replaces the chunk scan where the keys are all ones (the gate mass: `chunk_sum`)."""

        def local_scan():  # this sequence (shard) scanned from a zero state
            return chunk_scan(keys, values, layout, lr, clip) if scan is None else scan(values, layout)

        cp_group = self._context.cp_group
        if cp_group is None:
            fast, (committed, _) = local_scan()
            return fast, committed
        # Context parallel: scan the shard from zero, pass states across ranks, add what the incoming
        # state contributes to this shard's first document.
        cp = as_cp_group(cp_group)
        resets = layout.doc_start.any(dim=1)
        if cp.overlap and scan is None:  # the pieces' states first, sent while the (costly) local chunk scan runs
            committed, pending = state_transfer(keys, values, layout, lr)
            incoming, (fast, _) = state_scan_in_flight(committed, pending, resets, cp, local_scan)
        else:
            fast, (committed, pending) = local_scan()
            incoming = exclusive_state_scan(committed, pending, resets, cp)
        return fast + read_incoming_state(keys, layout, *incoming), committed

    def _own_value(self, source: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """`nomem`: each token reads only what it would write itself, lr * g_t * (T_t @ P): ntp's parameters
        (P and the write gate) and its start at zero, but nothing of an earlier chunk and nothing of a later
        token, so whatever it gains over `none` is capacity, not memory."""
        own = self.cfg.lr * (source @ self.ttt_proj.weight)
        return own if gates is None else gates * own

    def _values(self, source: torch.Tensor, target_layout) -> torch.Tensor:
        """Value targets of this shard; under CP they may read halo rows of the neighbouring shards."""
        conv = self.ttt_conv.weight if self.cfg.method == "inplace" else None
        proj = self.ttt_proj.weight if self.cfg.proj else None
        before, after = self._context.halo_widths
        if before or after:
            prev_rows, next_rows = halo_rows(source, self._context.cp_group, before, after)
            source = torch.cat([prev_rows, source, next_rows], dim=1)
        values = value_targets(self.cfg.method, source, target_layout, conv, proj)
        return values[:, before : values.shape[1] - after]

    def extra_repr(self) -> str:
        cfg = self.cfg
        return f"method={cfg.method}, chunk_size={cfg.chunk_size}, lr={cfg.lr}, write={cfg.write}"
