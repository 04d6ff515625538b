"""Hugging Face folders of TTT models: the base model's config.json and safetensors shards, the TTT settings as
config.json fields named as in the In-Place TTT release (trainer/export/fields.py), and the code that loads the
folder with `trust_remote_code=True` where this package is not installed (trainer/export/remote_code.py).

`load_ttt_model` reads both what `save_ttt_model` writes and the release's folders (its base config with the
`ttt_*` fields, no code) with this package's own code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from trainer.export.fields import ttt_config_fields, ttt_config_from_fields
from trainer.export.remote_code import read_config, write_remote_code
from trainer.materialize import Materializer, load_pretrained
from trainer.ttt import TTTConfig, patch_model
from trainer.ttt.patch import decoder_of

__all__ = ["load_ttt_model", "save_ttt_model", "ttt_config_fields", "ttt_config_from_fields"]


def save_ttt_model(model, folder: Path, max_shard_size: str | int = "5GB") -> None:
    """Write `model` (patched or not) as a self-contained Hugging Face folder; the TTT fields are added to
    `model.config`."""
    cfg = getattr(model, "ttt_config", TTTConfig(method="none"))
    model.config.update(ttt_config_fields(cfg, len(decoder_of(model).layers)))
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    write_remote_code(Path(folder), model)


def load_ttt_model(folder: Path, dtype: torch.dtype | str = "auto", clip: float | None = None):
    """The patched model of a folder written by `save_ttt_model` or by the In-Place TTT release, in eval
    mode. `clip` sets the inference-only tau (overriding the folder's); `dtype` "auto" is the folder's."""
    config = read_config(folder)
    ttt_cfg = ttt_config_from_fields(config)
    if clip is not None:
        ttt_cfg = dataclasses.replace(ttt_cfg, clip=clip)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    patch_model(model, ttt_cfg)
    Materializer(model, torch.device("cpu"), seed=0)(model)  # every value is then read from the folder
    load_pretrained(model, str(folder), with_ttt=True)
    return model.eval()
