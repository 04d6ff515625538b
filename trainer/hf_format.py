"""Hugging Face folders of TTT models: the base model's config.json and safetensors shards, plus the TTT
settings as config.json fields named as in the In-Place TTT release (ByteDance Seed, ICLR 2026).

The release's Qwen3/Llama configs carry `ttt_mode`, `ttt_layers`, `ttt_chunk`, `ttt_lr`, `ttt_proj` and
`ttt_target` ("hidden_states" | "input_embed"); its fast-weight MLPs name their weights exactly as
`FastWeightMLP` does (`model.layers.<i>.mlp.ttt_conv.weight`, a depthwise kernel-5 Conv1d applied per
chunk, and `model.layers.<i>.mlp.ttt_proj.weight`, used as `T @ P`), so weights need no renaming. It only
implements In-Place TTT, so three fields are ours and default to the release's behaviour when absent:

    ttt_method       TTTConfig.method       absent: "inplace"
    ttt_conv_kernel  TTTConfig.conv_kernel  absent: 5
    ttt_clip_tau     TTTConfig.clip         absent, null or <= 0: no clip (the name of a release fork's field)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from trainer.ttt import TTTConfig, patch_model
from trainer.ttt.patch import decoder_of

_RELEASE_TARGETS = {"hidden": "hidden_states", "embed": "input_embed"}
_TTT_WEIGHT = ".ttt_"  # in the names of the TTT parameters, and of no base-model parameter


def ttt_config_fields(cfg: TTTConfig, num_layers: int) -> dict:
    """config.json fields describing `cfg` for a model of `num_layers` decoder layers."""
    return {
        "ttt_mode": cfg.method != "none",
        "ttt_layers": cfg.layer_indices(num_layers),
        "ttt_chunk": cfg.chunk_size,
        "ttt_lr": cfg.lr,
        "ttt_proj": cfg.proj,
        "ttt_target": _RELEASE_TARGETS[cfg.target_source],
        "ttt_method": cfg.method,
        "ttt_conv_kernel": cfg.conv_kernel,
        "ttt_clip_tau": cfg.clip,
    }


def ttt_config_from_fields(config) -> TTTConfig:
    """The TTTConfig of a transformers config carrying our fields or the release's (see the module doc)."""
    if not getattr(config, "ttt_mode", False):
        return TTTConfig(method="none")
    targets = {release: ours for ours, release in _RELEASE_TARGETS.items()}
    target = getattr(config, "ttt_target", "hidden_states")
    if target not in targets:
        raise ValueError(f"ttt_target must be one of {', '.join(targets)}, got {target!r}")
    tau = getattr(config, "ttt_clip_tau", None)
    return TTTConfig(
        method=getattr(config, "ttt_method", "inplace"),
        layers=list(config.ttt_layers),
        chunk_size=int(config.ttt_chunk),
        lr=float(config.ttt_lr),
        conv_kernel=int(getattr(config, "ttt_conv_kernel", 5)),
        proj=bool(getattr(config, "ttt_proj", True)),
        target_source=targets[target],
        clip=float(tau) if tau is not None and tau > 0 else None,
    )


def save_ttt_model(model, folder: Path, max_shard_size: str | int = "5GB") -> None:
    """Write `model` (patched or not) as a Hugging Face folder; the TTT fields are added to `model.config`."""
    cfg = getattr(model, "ttt_config", TTTConfig(method="none"))
    model.config.update(ttt_config_fields(cfg, len(decoder_of(model).layers)))
    model.save_pretrained(folder, max_shard_size=max_shard_size)


def load_ttt_model(folder: Path, dtype: torch.dtype | str = "auto", clip: float | None = None):
    """The patched model of a folder written by `save_ttt_model` or by the In-Place TTT release, in eval
    mode. `clip` sets the inference-only tau (overriding the folder's)."""
    config = AutoConfig.from_pretrained(folder)
    ttt_cfg = ttt_config_from_fields(config)
    if clip is not None:
        ttt_cfg = dataclasses.replace(ttt_cfg, clip=clip)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the TTT weights as unexpected; checked below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"] or any(_TTT_WEIGHT not in k for k in info["unexpected_keys"]):
        raise ValueError(f"{folder}: weights do not fit {config.architectures}: {info}")
    patch_model(model, ttt_cfg)
    _load_ttt_weights(model, Path(folder))
    return model.eval()  # from_pretrained's eval mode does not reach the MLPs patched after it


def _load_ttt_weights(model, folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        file_of = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(folder / "model.safetensors", "pt") as f:
            file_of = dict.fromkeys(f.keys(), "model.safetensors")
    params = {name: p for name, p in model.named_parameters() if _TTT_WEIGHT in name}
    stored = {name for name in file_of if _TTT_WEIGHT in name}
    if stored != set(params):
        raise ValueError(
            f"{folder}: TTT weights {sorted(stored - set(params))} are not in the model, "
            f"{sorted(set(params) - stored)} are not in the folder (check ttt_layers / ttt_proj / ttt_method)"
        )
    with torch.no_grad():
        for file in sorted({file_of[name] for name in params}):
            with safe_open(folder / file, "pt") as f:
                for name in (n for n in params if file_of[n] == file):
                    params[name].copy_(f.get_tensor(name))
