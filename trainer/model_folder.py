"""Local Hugging Face model folders (`model.path`), checked before a job builds anything.

Everything a folder can get wrong is one `ValueError` line naming the file: a missing folder, no or
unreadable config.json, a model type transformers does not know, no safetensors weights, a damaged
safetensors file (its header is read, never the tensors), or tensors that do not fit the model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from trainer.export.remote_code import base_config_fields, read_config

_INDEX = "model.safetensors.index.json"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_model_config(folder: str) -> PretrainedConfig:
    """The folder's transformers config, read locally (never a hub look-up)."""
    path = Path(folder)
    if not path.exists():
        raise ValueError(f"model.path={folder}: no such folder")
    if not path.is_dir():
        raise ValueError(f"model.path={folder}: not a folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model.path={folder}: no config.json (not a Hugging Face model folder)")
    try:
        fields = json.loads(config_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({_first_line(err)})") from None
    # an exported folder (trainer/export/) is read as its base architecture
    model_type = base_config_fields(fields).get("model_type") if isinstance(fields, dict) else None
    if not isinstance(model_type, str):
        raise ValueError(f"{config_file}: no model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not a model type transformers knows")
    try:
        return read_config(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{config_file}: {_first_line(err)}") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / _INDEX
    if not index.is_file():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"model.path={path}: no *.safetensors weights")
        return files
    try:
        names = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index}: not a safetensors index ({_first_line(err)})") from None
    for name in names:
        if not (path / name).is_file():
            raise ValueError(f"{index}: lists {name}, which is missing")
    return [path / name for name in names]


def _header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors file's header, after checking that the file holds every byte
    the header describes (a truncated download fails here, not halfway through loading)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(handle.read(length))
        tensors = {name: t for name, t in header.items() if name != "__metadata__"}
        end = max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
        shapes = {name: tuple(int(d) for d in t["shape"]) for name, t in tensors.items()}
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError, ValueError) as err:
        raise ValueError(f"{file}: not a safetensors file ({_first_line(err)})") from None
    if 8 + length + end != size:
        raise ValueError(f"{file}: truncated or damaged ({size} bytes, its header describes {8 + length + end})")
    return shapes


def stored_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the folder's safetensors weights and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in _weight_files(Path(folder)):
        shapes.update(_header_shapes(file))
    return shapes


def _without_tied_duplicates(state: dict) -> list[str]:
    """Names of distinct tensors: a tied output head shares the embedding's tensor, and checkpoints
    store it once."""
    seen, names = set(), []
    for name, tensor in state.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            names.append(name)
    return names


def weights_mismatch(model: nn.Module, stored: dict[str, tuple[int, ...]], with_ttt: bool) -> str | None:
    """Why weights named and shaped `stored` do not fit `model`, or None. A released base model lacks
    the TTT parameters, which keep their drop-in values (`with_ttt` requires them)."""
    state = model.state_dict(keep_vars=True)
    expected = [name for name in _without_tied_duplicates(state) if with_ttt or ".ttt_" not in name]
    missing, unexpected = [n for n in expected if n not in stored], sorted(set(stored) - set(state))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        return f"the checkpoint does not match the model ({detail})"
    for name in expected:
        if tuple(state[name].shape) != tuple(stored[name]):
            return f"{name} is {tuple(stored[name])} in the checkpoint, {tuple(state[name].shape)} in the model"
    return None
