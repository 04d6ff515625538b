"""The trial side of a search (`hydra/sweeper=optuna`, the sweeper in hydra_plugins/ttt_search): a job that runs
one trial reports its objective as it trains, stops when the study's pruner says so, and records how it ended.

The sweeper asks the study for a trial and launches one ttt-train job for it, with `hydra.sweeper.trial=<number>`
and `hydra.sweeper.storage=<the study's storage>` among the job's overrides. The job (trainer/train.py) hands
`trial_spec` of its Hydra config to its ranks as `JobConfig.search` (W&B records it with the
trial's parameters); the training loop finds it through `SearchTrial.of(job)`. Only rank 0 opens the storage,
and every rank learns its decision, so all stop at the same step. Outside a search every call here does nothing.

Storage: a database URL (`sqlite:///...`, `postgresql://...`) or a file path, which holds Optuna's journal
(JournalStorage with its file backend: appends under a lock the file system provides, so processes on the
nodes of a shared file system can write one study). The job itself records its end (complete with its
objective, or pruned), so a trial that ends after its sweeper died keeps its result. The sweeper opens the storage
here too, after cutting a journal's torn end (`heal_journal`): a job never cuts a file a sweeper may be writing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import OBJECTIVES, ConfigError

JOURNAL = "optuna.journal"  # the default storage: this journal file in the sweep directory
DIRECTIONS = {"loss": "minimize", "accuracy": "maximize"}  # the way a search must take each objective
_NOT_READ = {True: "not an Optuna journal, or a corrupt one", False: "not a database Optuna can use"}


class StorageError(RuntimeError):
    """A study storage Optuna cannot open or read; the message is one line."""


def open_storage(url: str):
    """The Optuna storage at `url` (a database URL, or a journal file's path), read once to check it: a file that is
    not a journal, or a journal with a line Optuna cannot read, is a one-line StorageError."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweeper and the job say what happened themselves
    journal = is_journal(url)
    if journal:
        make_folder(Path(url).parent, f"hydra.sweeper.storage {url}")
    try:
        if journal:
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
        else:
            storage = optuna.storages.RDBStorage(url)
        studies = storage.get_all_studies()
    except Exception as err:  # what a foreign or corrupt store raises depends on where Optuna's reader trips
        raise StorageError(f"hydra.sweeper.storage {url}: {_NOT_READ[journal]} ({_reason(err)})") from None
    if journal and not studies and Path(url).stat().st_size > 0:  # a journal's first line creates a study
        raise StorageError(f"hydra.sweeper.storage {url}: {_NOT_READ[journal]} (no study in it)")
    return storage


def is_journal(url: str) -> bool:
    """`hydra.sweeper.storage` names a journal file, not a database URL."""
    return "://" not in url


def make_folder(folder: Path, what: str) -> None:
    """`folder` and its parents exist afterwards, or a one-line StorageError says why they cannot."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"{what}: cannot create the folder {folder} ({_reason(err)})") from None


def _reason(err: Exception) -> str:
    """An exception in a few words: its type and the first line of its message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def heal_journal(path: Path) -> str | None:
    """Cut a journal back to its last complete record when only its end is unreadable (a line a crash tore while
    writing it, or junk appended), keeping the original beside it; returns a line saying so, or None when there is
    nothing to cut. Left for open_storage to report: a bad line with records after it (a corruption in the middle)
    and a file whose first line is no record (not a journal). Only a sweeper heals, before its trials start, and
    under Optuna's own lock of the file, so that a record a job still appends is not taken for a torn one."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file():
        return None
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        with path.open("rb") as journal:
            lines = list(journal)  # split as Optuna's reader splits them
        keep = next((i for i, line in enumerate(lines) if not _is_record(line)), len(lines))
        if keep in (0, len(lines)) or any(_is_record(line) for line in lines[keep:]):
            return None
        size, kept = sum(len(line) for line in lines), sum(len(line) for line in lines[:keep])
        copy = path.with_name(f"{path.name}.torn-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
        temporary = copy.with_name(f".{copy.name}.tmp")
        shutil.copyfile(path, temporary)  # the whole original, complete under its name before the cut
        os.replace(temporary, copy)
        os.truncate(path, kept)  # in place: the records kept are never rewritten
    finally:
        lock.release()
    return (
        f"{path}: cut the {size - kept} bytes after its last complete record (a write torn by a crash, or junk "
        f"appended); the original is kept as {copy}"
    )


def _is_record(line: bytes) -> bool:
    """A complete line of an Optuna journal: a JSON object with an operation code, ended by a newline."""
    if not line.endswith(b"\n"):
        return False
    try:
        record = json.loads(line)
    except ValueError:  # not JSON, nor UTF-8
        return False
    return isinstance(record, dict) and "op_code" in record


def check_direction(direction, objective: str) -> None:
    """A search must go the objective's way: down for the loss, up for the accuracy. `direction` is
    `hydra.sweeper.direction`: an enum in the sweeper's schema, a string in a YAML file, None for other sweepers."""
    direction = getattr(direction, "name", direction)
    wanted = DIRECTIONS[objective]
    if isinstance(direction, str) and direction != wanted:
        raise ConfigError(f"hydra.sweeper.direction must be {wanted} for objective={objective}, got {direction!r}")


def trial_spec(sweeper) -> dict | None:
    """What the job of one trial needs to find it, from its Hydra config's `hydra.sweeper`; None outside a search."""
    if sweeper is None or sweeper.get("trial") is None:
        return None
    from omegaconf import OmegaConf

    return {
        "study": sweeper.study_name, "trial": int(sweeper.trial), "storage": sweeper.storage,
        "pruner": OmegaConf.to_container(sweeper.pruner, resolve=True), "report_every": int(sweeper.report_every),
    }  # fmt: skip


def _load(spec: dict):
    """The study (with its pruner) and this job's trial in it."""
    import optuna
    from hydra.utils import instantiate

    storage = open_storage(spec["storage"])
    study = optuna.load_study(study_name=spec["study"], storage=storage, pruner=instantiate(spec["pruner"]))
    study_id = storage.get_study_id_from_name(spec["study"])
    return study, optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, spec["trial"]))


class SearchTrial:
    """The trial a job runs, as the training loop sees it: `prunes` after every step."""

    def __init__(self, spec: dict | None, metric: str, last_step: int, lead: bool):
        self.spec, self.metric, self.last_step = spec, metric, last_step
        self.study, self.trial = _load(spec) if spec is not None and lead else (None, None)

    @classmethod
    def of(cls, job, lead: bool) -> SearchTrial:
        return cls(job.search, OBJECTIVES[job.objective], job.train.steps, lead)

    def prunes(self, step: int, record: dict | None, device: torch.device) -> bool:
        """After optimizer step `step`, with rank 0's metrics record: report the objective when it is due (the loss
        every `hydra.sweeper.report_every` steps, an accuracy at each evaluation) and say whether the trial stops
        here. In a search every rank calls it (a collective) and gets rank 0's answer."""
        if self.spec is None:
            return False
        flag = torch.tensor([self.trial is not None and self._report(step, record)], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def _report(self, step: int, record: dict) -> bool:
        import optuna

        value = record.get(self.metric)
        every = self.spec["report_every"] if self.metric == "loss" else 1  # eval/accuracy is there at evaluations
        if value is None or not math.isfinite(value) or step % every or step == self.last_step:
            return False
        number = self.spec["trial"]
        try:
            self.trial.report(value, step)
        except optuna.exceptions.UpdateFinishedTrialError:  # a resumed search failed it and retries it elsewhere
            print(f"trial {number} is no longer running in study {self.spec['study']}: stopping", file=sys.stderr)
            return True
        if not self.trial.should_prune():
            return False
        self.study.tell(number, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
        print(f"trial {number} pruned at step {step} ({self.metric} {value:.6g})", file=sys.stderr)
        return True


def finish_trial(spec: dict | None, objective: float | None) -> None:
    """Rank 0 of a trial's job, after training: the trial is complete with its objective, unless it was pruned (or a
    resumed search gave it up). Without an objective the trial stays running, and its sweeper fails it."""
    if spec is None or objective is None or not math.isfinite(objective):
        return
    from optuna.trial import TrialState

    study, _ = _load(spec)
    if any(t.number == spec["trial"] for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        study.tell(spec["trial"], objective, state=TrialState.COMPLETE, skip_if_finished=True)
