"""`apply_compile`: regional torch.compile, one decoder layer at a time (torchtitan's recipe).

Each layer is compiled in place (`nn.Module.compile`), so its class, parameter names and hooks stay as
they were: checkpoints, `parallel.engine.apply_fsdp` (which finds layers by class name and whose hooks
dynamo runs eagerly) and DeepSpeed see the plain model. Layers of one structure share their graphs (dynamo
guards on the structure, not on the module), so a model compiles about one graph per kind of layer.

Graphs break where host-side work must stay eager and unguarded: the fast-weight scan
(`FastWeightMLP._read_writes` walks the batch's segment plan on the host and calls custom autograd
Functions and Triton kernels), the CP halo exchange and the CP attention functions (collectives,
cached segment plans). Everything between is fused.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from trainer.ttt.patch import decoder_of

_RECOMPILE_LIMIT = 64  # cache entries per shared frame: every structural variant of the layers (see apply_compile)


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile each decoder layer of `model` in place; returns `model`. Call it after activation
    checkpointing is enabled and before FSDP2 shards the layers."""
    # Every layer shares dynamo's frames (transformers' layer wrapper, the layer and MLP forwards), so their cache
    # entries multiply structural variants: layer kinds x checkpointed or not x FSDP2's wrapper class x training or
    # evaluation x packed or not. A fsdp2 run with TTT on every other layer, every other layer checkpointed and an
    # evaluation fills the default 8 entries of one frame; past the limit dynamo runs new variants eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    compiled_functions: dict = {}  # the layer classes' forwards, compiled once for all checkpointed layers
    for layer in decoder_of(model).layers:
        layer.compile(backend=backend)
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = _checkpointing_compiled(
                layer._gradient_checkpointing_func, backend, compiled_functions
            )
    return model


def _checkpointing_compiled(checkpoint, backend: str, compiled_functions: dict):
    """transformers' checkpointed layer calls `checkpoint(partial(forward, layer, **kwargs), *args)`. Dynamo
    cannot trace a checkpoint whose `context_fn` restores the TTT layout, and an eager checkpoint around a
    compiled forward would recompute eagerly (other saved tensors). So the checkpoint itself runs eagerly
    and both its forward and its recomputation call one compiled forward."""

    @torch.compiler.disable
    def run(fn, *args):
        if isinstance(fn, functools.partial):
            if fn.func not in compiled_functions:
                compiled_functions[fn.func] = torch.compile(fn.func, backend=backend)
            fn = functools.partial(compiled_functions[fn.func], *fn.args, **fn.keywords)
        else:  # another transformers release: compile what it checkpoints (slower, a wrapper per call)
            fn = torch.compile(fn, backend=backend)
        return checkpoint(fn, *args)

    return run
