"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically, resumable at any world size.

Layout of `<run>/checkpoints/step-<N>/`: the DCP files of the model and optimizer (or, for
`parallel.engine=deepspeed`, DeepSpeed's own files under `deepspeed/`), `rng-rank<r>.json` per rank
and `meta.json` (format, step, data position, W&B run id, world size, and every other file's size
and sha256). A checkpoint is written under `.step-<N>.partial/`; once every rank has finished, the
ranks hash and fsync a slice of the files each, and rank 0 writes meta.json, fsyncs the folder and
renames it. A crash mid-save leaves the previous checkpoint valid and the partial one ignored (and
removed by the next save); a power loss cannot leave a renamed checkpoint with unwritten files.
`checkpoint_problem` checks a checkpoint against its meta.json before a job trusts it. DCP reshards
on load, so a run may resume with another number of processes or CP degree. Nothing on disk is unpickled:
DCP's index goes through `trainer.checkpoint.dcp_reader`, RNG states are JSON, and DeepSpeed's files are read with
torch's weights-only unpickler (`deepspeed_foreign_objects` names what else a file would build).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer.checkpoint.dcp_reader import CheckpointReader
from trainer.integrity import file_problem, file_sha256, fsync_file, fsync_folder, rank_slice, shared_verdict

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
    """The RNG states as JSON (byte lists), so that reading them back unpickles nothing."""
    version, words, gauss = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(), "python": [version, list(words), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _hash_my_slice(folder: Path) -> dict[str, dict]:
    """Size and sha256 of this rank's share of the files under `folder`, each fsynced (no collective)."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    mine = {}
    for name in rank_slice(names):
        fsync_file(folder / name)
        mine[name] = {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    return mine


def _gather_records(mine: dict[str, dict]) -> dict[str, dict]:
    """Every rank's share of the file records, in name order. Collective."""
    if not dist.is_initialized():
        return mine
    gathered: list[dict] = [{}] * _world()
    dist.all_gather_object(gathered, mine)
    return {name: record for part in gathered for name, record in sorted(part.items())}


def _begin(root: Path, step: int) -> Path:
    """The empty partial folder of checkpoint `step` (partial folders of crashed saves are removed first)."""
    partial = root / f".step-{step}.partial"
    if _rank() == 0:
        for stale in root.glob(".step-*.partial"):
            shutil.rmtree(stale)
        partial.mkdir(parents=True)
    _barrier()
    return partial


def _finish(root: Path, step: int, partial: Path, meta: dict, keep: int, mine: dict | None = None) -> Path:
    """Make a written checkpoint durable and visible: size and sha256 of every file in meta.json, everything
    fsynced, the folder renamed into place, the oldest beyond `keep` removed. `mine`: this rank's share of the
    file records, when the background already made it. Collective."""
    _barrier()
    files = _gather_records(_hash_my_slice(partial) if mine is None else mine)
    final = root / f"step-{step}"
    if _rank() == 0:
        meta = {**meta, "step": step, "world_size": _world(), "files": files}
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        fsync_file(partial / "meta.json")
        for folder in sorted({(partial / name).parent for name in files}, reverse=True):
            fsync_folder(folder)  # the names of the files, then of the subfolders, are durable too
        if final.exists():  # re-saving a step (e.g. preemption right after a periodic save)
            shutil.rmtree(final)
        partial.rename(final)
        fsync_folder(root)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def save_checkpoint(root: Path, step: int, model, optimizer, meta: dict, keep: int, deepspeed_engine=None) -> Path:
    """Write checkpoint `step` atomically; DeepSpeed jobs use DeepSpeed's own format inside the same layout."""
    partial = _begin(root, step)
    if deepspeed_engine is not None:
        deepspeed_engine.save_checkpoint(str(partial), tag=_DEEPSPEED_TAG)
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=partial, no_dist=not dist.is_initialized())
    (partial / f"rng-rank{_rank()}.json").write_text(json.dumps(_rng_state()))
    meta = {**meta, "format": "deepspeed" if deepspeed_engine is not None else "dcp"}
    return _finish(root, step, partial, meta, keep)


def _hash_when_written(written: Future, partial: Path) -> dict[str, dict]:
    written.result()  # a failed write raises, here and then in `Checkpointer.wait`
    return _hash_my_slice(partial)


class Checkpointer:
    """A run's checkpoints, written in place (`save_checkpoint`) or, with `checkpoint.async_save`, in the background.

    An async save stages the model and optimizer state in CPU memory (DCP's `async_save`: a copy, so the next steps
    may change the weights) and writes the files from a thread over a process group of its own (the training's
    collectives never share one with it), while training goes on; the RNG state and the data position are those of
    the step it was started at. It becomes a checkpoint only once every rank's files are written: `poll`, called
    after each step, agrees on that across ranks and then runs the same finish as a synchronous save (meta.json with
    every file's size and sha256, fsync, rename, keep). Until then the files sit in `.step-N.partial/`, which resume
    never reads: a crash or SIGKILL during the background write leaves the previous checkpoint as the resume point.
    One save is in flight at a time: a save that finds the previous one still writing waits for it.
    """

    def __init__(self, root: Path, keep: int, async_save: bool, deepspeed_engine=None):
        self.root, self.keep, self.async_save, self.deepspeed_engine = root, keep, async_save, deepspeed_engine
        self.pending: tuple[int, Path, dict, Future] | None = None  # step, partial folder, meta, this rank's records
        self.group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self.background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if async_save else None

    def save(self, step: int, model, optimizer, meta: dict) -> Path | None:
        """Checkpoint `step`; returns its folder, or None while an async save is still writing it."""
        self.wait()
        if not self.async_save:
            return save_checkpoint(self.root, step, model, optimizer, meta, self.keep, self.deepspeed_engine)
        partial = _begin(self.root, step)
        (partial / f"rng-rank{_rank()}.json").write_text(json.dumps(_rng_state()))  # before any rank's write ends
        model_state, optim_state = get_state_dict(model, optimizer)
        written = dcp.async_save(
            {"model": model_state, "optim": optim_state}, checkpoint_id=partial, process_group=self.group,
            no_dist=not dist.is_initialized(),
        )  # fmt: skip
        # Its future ends after DCP's closing collective, when every rank's files and .metadata exist: then this
        # rank hashes its share of them, still in the background.
        records = self.background.submit(_hash_when_written, written, partial)
        self.pending = (step, partial, {**meta, "format": "dcp"}, records)
        return None

    def poll(self, device: torch.device) -> Path | None:
        """After a step: the checkpoint an async save just completed on every rank, else None. Collective while a
        save is pending (every rank has one: saves start at the same steps)."""
        if self.pending is None:
            return None
        done = torch.tensor([int(self.pending[3].done())], device=device)
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self.wait() if done.item() else None

    def wait(self) -> Path | None:
        """Block until the pending async save is written, and finish it; returns it (None if none was pending)."""
        if self.pending is None:
            return None
        step, partial, meta, records = self.pending
        self.pending = None
        return _finish(self.root, step, partial, meta, self.keep, records.result())  # a failed write raises here


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json; ValueError with one line if it is not what `save_checkpoint` writes."""
    try:
        meta = json.loads((path / "meta.json").read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / 'meta.json'}: unreadable ({str(err).splitlines()[0]})") from None
    keys = ("step", "world_size", "data", "files")
    if not isinstance(meta, dict) or any(key not in meta for key in keys) or not isinstance(meta["files"], dict):
        raise ValueError(f"{path / 'meta.json'}: not a checkpoint's meta.json (needs {', '.join(keys)})")
    return meta


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (meta.json, a listed file missing, truncated or
    corrupted), or None. Collective in a process group: each rank hashes a slice."""
    try:
        records = read_meta(path)["files"]
        problem = None
    except ValueError as err:
        records, problem = {}, str(err)
    for name, record in rank_slice(sorted(records.items())):
        if problem is None:
            try:
                problem = file_problem(path / name, record["size"], record["sha256"], "checkpoint", "meta.json")
            except (KeyError, TypeError):
                problem = f"{path / 'meta.json'}: malformed record of {name}"
    return shared_verdict(problem)


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


def verified_resume(root: Path, resume: str | None, report) -> Path | None:
    """`resolve_resume` for a job about to trust what it loads: a named checkpoint must verify
    (ValueError otherwise); "auto" takes the newest one that verifies, passing each damaged newer one
    to `report` as one line, and fails if none of them does."""
    if resume is None:
        return None
    path = resolve_resume(root, resume)
    if resume != "auto":
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ValueError(f"checkpoint.resume={resume}: damaged checkpoint: {problem}")
        return path
    damaged = []  # (name, problem), newest first
    for path in reversed(complete_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            for name, why in damaged:
                report(f"checkpoint.resume=auto: {name} is damaged ({why}); resuming from {path.name}")
            return path
        damaged.append((path.name, problem))
    if damaged:
        raise ValueError(f"checkpoint.resume=auto: every checkpoint under {root} is damaged (newest: {damaged[0][1]})")
    return None


def _deepspeed_types() -> list[type]:
    """What DeepSpeed's checkpoint files hold besides tensors, containers and numbers (ZeRO 2 and 3)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def deepspeed_foreign_objects(path: Path) -> str | None:
    """The first DeepSpeed file of checkpoint `path` that would build other objects, and what they are."""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in _deepspeed_types()}
    for file in sorted((path / _DEEPSPEED_TAG).glob("*.pt")):
        foreign = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(file)) - allowed)
        if foreign:
            return f"{file}: holds objects a checkpoint should not ({', '.join(foreign)}); not loading it"
    return None


def _load_deepspeed(engine, path: Path) -> None:
    """DeepSpeed's reader unpickles with weights_only=False (any object, any code); read its files with
    torch's weights-only unpickler, allowing only DeepSpeed's own checkpoint types."""

    def weights_only_load(file: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_types()):
            return torch.load(file, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = weights_only_load
    engine.load_checkpoint(str(path), tag=_DEEPSPEED_TAG)


def load_checkpoint(path: Path, model, optimizer, deepspeed_engine=None) -> dict:
    """Load model and optimizer in place (DCP reshards as needed); returns the checkpoint's meta.
    The checkpoint is trusted: start-up (trainer/preflight.py) verified it and its format."""
    meta = read_meta(path)
    if deepspeed_engine is not None:
        _load_deepspeed(deepspeed_engine, path)
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, storage_reader=CheckpointReader(path), no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng-rank{_rank()}.json"
    if meta["world_size"] == _world() and rng.exists():
        _set_rng_state(json.loads(rng.read_text()))
    return meta
