"""`apply_cp`: run a Hugging Face decoder on this rank's shard of every sequence.

Applied from outside the model (as torchtitan does): it selects a CP attention function through
transformers' AttentionInterface and hands the CP process group to every module that implements
`set_context_parallel(group)` (the fast-weight MLPs, which then pass their states across ranks).
"""

from __future__ import annotations

from torch import nn

from parallel.attention import register_cp_attention


def apply_cp(model: nn.Module, group, attention: str = "allgather") -> nn.Module:
    name = register_cp_attention(attention, group)
    model.set_attn_implementation(name)
    for module in model.modules():
        if hasattr(module, "set_context_parallel"):
            module.set_context_parallel(group)
    return model
