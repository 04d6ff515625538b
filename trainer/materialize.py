"""Turn a model built on the meta device into real tensors, one unit at a time, and load weights.

A model of any size is first built on the meta device (shapes only). `Materializer` allocates and
initialises it unit by unit (FSDP2 calls it for each decoder layer just before sharding it, so a
rank never holds more than one full layer or the embeddings at once). Every module draws its
initial values from its own seed, derived from the job seed and the module's name, so the values
do not depend on how the model is split into units or on the world size: a sharded run starts
from exactly the weights a single process builds.

`load_pretrained` then reads a Hugging Face safetensors folder with torch's DCP reader, which
copies into each rank only the slices of its own shards.
"""

from __future__ import annotations

import contextlib
import itertools
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, HuggingFaceStorageReader

from trainer.model_folder import weights_mismatch
from trainer.ttt.mlp import FastWeightMLP


def _has_meta_tensors(module: nn.Module) -> bool:
    tensors = itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))
    return any(t.is_meta for t in tensors)


class Materializer:
    """Callable on any submodule (a "unit") of `model`: gives each of its still-meta modules real
    storage on `device` and its initial values (transformers' `_init_weights`, then the TTT
    modules' own V = 0 initialisation)."""

    def __init__(self, model: nn.Module, device: torch.device, seed: int):
        self.model, self.device, self.seed = model, device, seed
        self.names = {module: name for name, module in model.named_modules()}

    def __call__(self, unit: nn.Module) -> None:
        fresh = [m for m in unit.modules() if _has_meta_tensors(m)]
        for module in fresh:
            module.to_empty(device=self.device, recurse=False)
        if any(m in fresh for m in (self.model.get_input_embeddings(), self.model.get_output_embeddings())):
            self.model.tie_weights()  # to_empty gave tied modules separate tensors
        touched = set(fresh)
        ttt = [m for m in unit.modules() if isinstance(m, FastWeightMLP) and touched.intersection(m.modules())]
        for module in fresh:
            with self._seeded(module):
                self.model._init_weights(module)
        for module in ttt:  # after transformers' init, which would give the TTT modules random values
            module.reset_ttt_parameters()

    @contextlib.contextmanager
    def _seeded(self, module: nn.Module):
        """The global RNG (which transformers' init draws from) seeded for this module alone."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(self.names[module].encode()))
            yield


def load_pretrained(model: nn.Module, folder: str, with_ttt: bool = False) -> None:
    """Copy a Hugging Face safetensors checkpoint into `model` (plain or FSDP2-sharded parameters,
    any dtype). A released base model lacks the TTT parameters, which keep their drop-in initial
    values (one exported from a TTT run has them; `with_ttt` requires them); any other parameter
    the folder lacks, or a tensor it has that the model lacks, is an error."""
    reader = HuggingFaceStorageReader(folder)
    stored = {name: tuple(meta.size) for name, meta in reader.read_metadata().state_dict_metadata.items()}
    problem = weights_mismatch(model, stored, with_ttt)
    if problem is not None:
        raise ValueError(f"model.path={folder}: {problem}")
    planner = DefaultLoadPlanner(allow_partial_load=True)
    dcp.load(model.state_dict(), storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
