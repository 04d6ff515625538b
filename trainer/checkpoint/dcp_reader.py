"""Read DCP checkpoints without unpickling arbitrary objects.

DCP stores a checkpoint's index (`.metadata`) as a pickle, and `pickle.load` of a file can run any
code. `CheckpointReader` reads it with an unpickler that builds only the index's own types (DCP's
metadata dataclasses, torch.Size, dtypes, layouts, paths), the way `torch.load(weights_only=True)`
guards tensor files; DCP's tensor payloads are raw storage bytes, and its byte items are read
with `weights_only=True` already.
"""

from __future__ import annotations

import pathlib
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "Path"),
    ("collections", "OrderedDict"),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if module in _ALLOWED_MODULES or (module, name) in _ALLOWED else None
        if found is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint index")
        return found


def read_index(folder: Path) -> Metadata:
    """A DCP checkpoint's index; pickle.UnpicklingError (or OSError, EOFError) if it is damaged or foreign."""
    with open(Path(folder) / ".metadata", "rb") as handle:
        metadata = _IndexUnpickler(handle).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"{folder}/.metadata is not a DCP checkpoint index")
    return metadata


class CheckpointReader(FileSystemReader):
    """DCP's file reader, with the index read by `read_index`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_index(pathlib.Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
