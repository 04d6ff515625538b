"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically, resumable at any world size.

Layout of `<run>/checkpoints/step-<N>/`: the DCP files of the model and optimizer (or, for
`parallel.engine=deepspeed`, DeepSpeed's own files under `deepspeed/`), `meta.json` (format, step,
data position, W&B run id, world size) and `rng-rank<r>.pt` per rank. A checkpoint is
written under `.step-<N>.partial/` and renamed when every rank has finished, so a crash mid-save
leaves the previous checkpoint valid and the partial one ignored (and removed by the next save).
DCP reshards on load, so a run may resume with another number of processes or CP degree.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_STEP_DIR = re.compile(r"^step-(\d+)$")
_DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's subfolder inside a checkpoint directory


# DCP warns on every single-process save/load; that is how one-process jobs run here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").exists()
    ]
    return [p for _, p in sorted(found)]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model, optimizer, meta: dict, keep: int, deepspeed_engine=None) -> Path:
    """Write checkpoint `step` atomically; DeepSpeed jobs use DeepSpeed's own format inside the same layout."""
    final = root / f"step-{step}"
    partial = root / f".step-{step}.partial"
    if _rank() == 0:
        for stale in root.glob(".step-*.partial"):
            shutil.rmtree(stale)
        partial.mkdir(parents=True)
    _barrier()
    if deepspeed_engine is not None:
        deepspeed_engine.save_checkpoint(str(partial), tag=_DEEPSPEED_TAG)
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=partial, no_dist=not dist.is_initialized())
    torch.save(_rng_state(), partial / f"rng-rank{_rank()}.pt")
    meta = {**meta, "format": "deepspeed" if deepspeed_engine is not None else "dcp"}
    _barrier()
    if _rank() == 0:
        (partial / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": _world()}, indent=1))
        if final.exists():  # re-saving a step (e.g. preemption right after a periodic save)
            shutil.rmtree(final)
        partial.rename(final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def resolve_resume(root: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None, the latest complete one ("auto"), or a given path."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete checkpoint (no meta.json)")
    return path


def load_checkpoint(path: Path, model, optimizer, deepspeed_engine=None) -> dict:
    """Load model and optimizer in place (DCP reshards as needed); returns the checkpoint's meta."""
    meta = json.loads((path / "meta.json").read_text())
    wanted = "deepspeed" if deepspeed_engine is not None else "dcp"
    if meta.get("format", "dcp") != wanted:
        raise ValueError(f"{path} is a {meta.get('format', 'dcp')} checkpoint; this job's engine reads {wanted}")
    if deepspeed_engine is not None:
        deepspeed_engine.load_checkpoint(str(path), tag=_DEEPSPEED_TAG)
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng-rank{_rank()}.pt"
    if meta["world_size"] == _world() and rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return meta
