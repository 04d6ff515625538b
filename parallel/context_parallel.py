"""`apply_cp`: run a Hugging Face decoder on this rank's shard of every sequence.

Applied from outside the model (as torchtitan does): it selects a CP attention function through
transformers' AttentionInterface and hands the CP group (a `CPGroup`: the process group and its load
balance and layout) to every module that implements `set_context_parallel(group)` (the fast-weight MLPs, which
then pass their states across ranks). A shard of n > 1 pieces holds pieces of the sequence that need
not touch, so those modules see each piece as a row of its own: hooks fold (B, nL, d) inputs into
(nB, L, d) piece rows and unfold the outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.attention import register_cp_attention
from parallel.pieces import CPGroup, fold, unfold


def apply_cp(model: nn.Module, group, attention: str = "allgather", load_balance: str = "contiguous") -> nn.Module:
    """`group`: a process group (laid out by `load_balance`) or a `CPGroup`, whose `arrange` the caller
    then calls with each batch's positions before sharding it."""
    cp = group if isinstance(group, CPGroup) else CPGroup(group, load_balance)
    name = register_cp_attention(attention, cp)
    model.set_attn_implementation(name)
    for module in model.modules():
        if hasattr(module, "set_context_parallel"):
            module.set_context_parallel(cp)
            if cp.per_rank > 1:
                module.register_forward_pre_hook(_folding(cp), with_kwargs=True)
                module.register_forward_hook(lambda module, args, output: unfold(output, cp))
    return model


def _folding(cp: CPGroup):
    def hook(module, args, kwargs):
        args = tuple(fold(a, cp) if isinstance(a, torch.Tensor) else a for a in args)
        return args, {k: fold(v, cp) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

    return hook
