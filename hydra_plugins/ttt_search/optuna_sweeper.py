"""`hydra/sweeper=optuna`: a Hydra sweeper that searches with Optuna, over a study kept on disk.

Each batch of `n_jobs` trials asked from the study goes to the selected `hydra/launcher` (basic, local_jobs, slurm)
as one ttt-train job per trial, run in `<sweep dir>/<trial number>`. A job records its trial's end in the study
itself (trainer/search.py): complete with the objective ttt-train returns, or pruned by `hydra.sweeper.pruner`
from the values it reported while training. What a job leaves unfinished, its sweeper marks failed.

The study lives in `hydra.sweeper.storage` (default: the journal file `<sweep dir>/optuna.journal`), so running the
same command again resumes it: finished trials are kept, trials a dead sweeper left running are marked failed and
asked again with the same parameters, and the sampler goes on from the study's history, reseeded with the
number of trials the study holds so that it does not propose its first points again. At the end the best
trial, the parameter importances, `optimization_results.yaml` and a plot of the trials (`trials.png`).

Before the study is touched, every setting is checked (counts, direction, search space, sampler, pruner, and the
config of a trial at each edge of the space, composed and validated as the job would); a bad one is one line and
exit code 2. Then one sweeper per study: a lock file with a heartbeat (SweeperLock). A journal's torn end, which a
crash while writing leaves, is cut back to its last complete record before Optuna reads it (trainer/search.py).

Only configuration lives at module level: Hydra imports every module of hydra_plugins at each start (before it
lists the module in sys.modules, so no `from __future__ import annotations`: dataclasses would look it up there).
"""

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from itertools import groupby
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.errors import InstantiationException
from hydra.plugins.sweeper import Sweeper
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger(__name__)


class Direction(Enum):
    minimize = 1
    maximize = 2


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10  # random points before TPE models the study
    multivariate: bool = False
    constant_liar: bool = True  # trials still running count as bad guesses, so a batch spreads out


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    n_startup_trials: int = 1
    sigma0: float | None = None


@dataclass
class QMCSamplerConf:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None
    qmc_type: str = "sobol"
    scramble: bool = True  # with seed: a different sequence per seed (a resumed study is reseeded)


@dataclass
class GPSamplerConf:
    _target_: str = "optuna.samplers.GPSampler"
    seed: int | None = None
    n_startup_trials: int = 10


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConf:  # stops a trial whose reported value is worse than the median of earlier trials' at that step
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # trials that finish before any is pruned
    n_warmup_steps: int = 0  # steps of a trial before it may be pruned
    interval_steps: int = 1


@dataclass
class PercentilePrunerConf:
    _target_: str = "optuna.pruners.PercentilePruner"
    percentile: float = 25.0  # keep the best 25%
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0


@dataclass
class ThresholdPrunerConf:  # stops a trial whose reported value leaves [lower, upper], e.g. a loss that diverges
    _target_: str = "optuna.pruners.ThresholdPruner"
    lower: float | None = None
    upper: float | None = None
    n_warmup_steps: int = 0
    interval_steps: int = 1


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.ttt_search.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds its sampler itself (reseeded on resume); jobs build the pruner
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    sampler: Any = MISSING  # hydra/sweeper/sampler: tpe, random, cmaes, qmc, gp
    pruner: Any = MISSING  # hydra/sweeper/pruner: none, median, percentile, threshold, hyperband, successive_halving
    direction: Direction = Direction.minimize
    study_name: str = "search"
    storage: str | None = None  # a journal file's path, or a database URL; null: <sweep dir>/optuna.journal
    n_trials: int = 20  # trials the study holds at the end (complete, pruned or failed; a retried one counts once)
    n_jobs: int = 2  # trials handed to the launcher at once
    max_failure_rate: float = 0.0  # of a batch's trials; above it the search stops with the first failure
    report_every: int = 10  # steps between the loss values a trial reports to the pruner (an accuracy: each eval)
    params: dict[str, str] = field(default_factory=dict)  # key: search space (_search_space.py) or fixed value
    trial: int | None = None  # set by the sweeper in each trial's job: the trial's number in the study


_STORE = ConfigStore.instance()
_STORE.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="ttt_search")
for _name, _node in {"tpe": TPESamplerConf, "random": RandomSamplerConf, "cmaes": CmaEsSamplerConf,
                     "qmc": QMCSamplerConf, "gp": GPSamplerConf}.items():  # fmt: skip
    _STORE.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="ttt_search")
for _name, _node in {"none": NopPrunerConf, "median": MedianPrunerConf, "percentile": PercentilePrunerConf,
                     "threshold": ThresholdPrunerConf, "hyperband": HyperbandPrunerConf,
                     "successive_halving": SuccessiveHalvingPrunerConf}.items():  # fmt: skip
    _STORE.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="ttt_search")


@contextmanager
def _refusals():
    """A bad search setting or storage: one line on stderr and exit code 2, as ttt-train's other start-up checks."""
    from hydra_plugins.ttt_search._search_space import SearchSpaceError
    from trainer.config import ConfigError
    from trainer.search import StorageError

    try:
        yield
    except (ConfigError, SearchSpaceError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except InstantiationException as err:  # a sampler's or pruner's keys it refuses, e.g. threshold without bounds
        print(f"error: {' '.join(str(err).splitlines()[:2])}", file=sys.stderr)
        sys.exit(2)


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: DictConfig, pruner: DictConfig, direction, study_name: str, storage: str | None,
                 n_trials: int, n_jobs: int, max_failure_rate: float, report_every: int, params: DictConfig,
                 trial: int | None) -> None:  # fmt: skip
        self.sampler, self.pruner, self.direction = sampler, pruner, getattr(direction, "name", direction)
        self.study_name, self.storage, self.n_trials, self.n_jobs = study_name, storage, n_trials, n_jobs
        self.max_failure_rate, self.report_every, self.params = max_failure_rate, report_every, params
        self.config = self.launcher = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        """Everything that can be checked is, before the study is touched; then, holding the study's lock, the
        journal's torn end is cut, the study opened and searched until n_trials have ended."""
        from trainer.search import JOURNAL, is_journal

        sweep_dir = Path(self.config.hydra.sweep.dir).absolute()
        url = self.storage or str(sweep_dir / JOURNAL)
        if is_journal(url):  # the same file for jobs that start elsewhere
            url = str(Path(url).absolute())
        with _refusals():
            space, fixed = self._checked_space(arguments, url)
            lock = _lock_of(url, self.study_name, sweep_dir)
            lock.acquire()
        try:
            with _refusals():
                study = self._open_study(url)
            self._search(study, space, fixed, url)
            self._summarize(study, sweep_dir, url)
        finally:
            lock.release()

    def _checked_space(self, arguments: list[str], url: str) -> tuple[dict, list[str]]:
        """The search space and the fixed overrides, once the counts, the direction, the space, the sampler, the
        pruner and the config of a trial at each edge of the space are known to be good."""
        from hydra_plugins.ttt_search._search_space import parse_search_space
        from trainer.search import check_direction

        self._check_counts()
        check_direction(self.direction, self.config.get("objective", "loss"))
        space, fixed = parse_search_space([f"{k}={v}" for k, v in (self.params or {}).items()] + list(arguments))
        self._check_trial_configs(space, fixed, url)
        self._sampler(0)  # built to check their keys; the sampler searched with is seeded once the study is read
        instantiate(self.pruner)
        return space, fixed

    def _check_counts(self) -> None:
        from trainer.config import ConfigError

        for key in ("n_trials", "n_jobs", "report_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"hydra.sweeper.{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if not 0 <= self.max_failure_rate <= 1:
            raise ConfigError(f"hydra.sweeper.max_failure_rate must be in [0, 1], got {self.max_failure_rate!r}")

    def _check_trial_configs(self, space: dict, fixed: list[str], url: str) -> None:
        """Compose the config of a trial's job at each edge of the space, with Hydra's own loader as its basic sweeper
        does, and validate it as the job does: a misspelled key, or a value the job would refuse, is one line
        instead of failed trials that count towards n_trials."""
        from hydra.errors import HydraException
        from omegaconf import open_dict, read_write
        from omegaconf.errors import OmegaConfBaseException

        from hydra_plugins.ttt_search._search_space import edge_points, trial_overrides
        from trainer.config import ConfigError, job_config

        for params in edge_points(space):
            try:
                config = self.hydra_context.config_loader.load_sweep_config(
                    self.config, _job_overrides(params, fixed, 0, url)
                )
                with read_write(config), open_dict(config):
                    del config["hydra"]  # what the job's task function gets
                job_config(config)
            except (HydraException, OmegaConfBaseException, ConfigError) as err:
                trial = f" (a trial with {' '.join(trial_overrides(params))})" if params else ""
                reason = " ".join(str(err).split("\n\n")[0].split())  # Hydra's lists of options and search paths: out
                raise ConfigError(reason + trial) from None

    def _open_study(self, url: str):
        """The study, loaded if the storage holds it (going the same way), created if not: a run with nothing left
        to do, or a refused one, writes nothing to it. A journal's torn end is cut before Optuna reads it."""
        import optuna

        from trainer.config import ConfigError
        from trainer.search import heal_journal, is_journal, open_storage

        if is_journal(url) and (healed := heal_journal(Path(url))):
            log.warning(healed)
        storage = open_storage(url)
        pruner = instantiate(self.pruner)
        try:
            study_id = storage.get_study_id_from_name(self.study_name)
        except KeyError:
            return optuna.create_study(
                storage=storage, study_name=self.study_name, direction=self.direction, sampler=self._sampler(0),
                pruner=pruner,
            )  # fmt: skip
        held = storage.get_study_directions(study_id)[0].name.lower()
        if held != self.direction:
            raise ConfigError(f"study {self.study_name} in {url} is to {held}: use another study_name")
        trials_held = len(storage.get_all_trials(study_id, deepcopy=False))
        return optuna.load_study(
            study_name=self.study_name, storage=storage, sampler=self._sampler(trials_held), pruner=pruner
        )

    def _sampler(self, trials_held: int):
        """The configured sampler; in a study that already holds trials, with its seed moved on by their number,
        so that a resumed search draws new start-up points instead of the ones it drew before."""
        seed = self.sampler.get("seed")
        if seed is None or trials_held == 0:
            return instantiate(self.sampler)
        return instantiate(self.sampler, seed=seed + trials_held)

    def _search(self, study, space: dict, fixed: list[str], url: str) -> None:
        """Trials a dead sweeper left running are asked again; then batches of trials until n_trials have ended."""
        _retry_interrupted(study)
        ended = _counted(study)
        state = f"Study {self.study_name} in {url}: {ended} of {self.n_trials} trials ended"
        if ended >= self.n_trials:
            state += "; the search is complete (raise hydra.sweeper.n_trials to extend it)"
        log.info(state)
        while (left := self.n_trials - _counted(study)) > 0:
            self._run(study, [study.ask(space) for _ in range(min(self.n_jobs, left))], fixed, url)

    def _run(self, study, trials: list, fixed: list[str], url: str) -> None:
        """One batch: a job per trial through the launcher, in <sweep dir>/<trial number>; then the trials whose jobs
        recorded no end fail, and more failures than max_failure_rate allows stop the search."""
        from hydra.core.utils import JobStatus

        batch = [_job_overrides(t.params, fixed, t.number, url) for t in trials]
        returns = []
        try:  # the launcher numbers a launch's jobs from initial_job_idx: launch consecutive trial numbers together
            for _, run in groupby(range(len(trials)), key=lambda i: trials[i].number - i):
                run = list(run)
                returns += self.launcher.launch([batch[i] for i in run], initial_job_idx=trials[run[0]].number)
        finally:  # also when the launcher itself failed
            failed = _fail_unfinished(study, trials, returns)
            self._remove_job_folder_template()
        ended = {t.number: t for t in study.get_trials(deepcopy=False)}
        for trial in trials:
            log.info(_outcome(ended[trial.number]))
        if len(failed) > self.max_failure_rate * len(trials):
            for ret in failed.values():
                if ret is not None and ret.status == JobStatus.FAILED:
                    _ = ret.return_value  # raises the job's own error
            rate = f"hydra.sweeper.max_failure_rate={self.max_failure_rate}"
            raise RuntimeError(f"trials {sorted(failed)} ended without a result ({rate})")

    def _remove_job_folder_template(self) -> None:
        """The submitit launchers make the folder of their folder's template (`.submitit/%j`) as well as each job's;
        left empty, it goes."""
        template = self.config.hydra.launcher.get("submitit_folder")
        if template is not None:
            with suppress(OSError):  # not there, or not empty
                Path(template).rmdir()

    def _summarize(self, study, sweep_dir: Path, url: str) -> None:
        from optuna.trial import TrialState

        from trainer.tracking import write_text_atomically

        objective = self.config.get("objective", "objective")
        states = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
        results = {"name": "optuna", "study_name": self.study_name, "storage": url, "direction": self.direction,
                   "trials": {k: v for k, v in states.items() if v}}  # fmt: skip
        if states["complete"]:
            best = study.best_trial
            results.update(best_trial=best.number, best_params=best.params, best_value=best.value)
            log.info(f"Best trial {best.number}: {objective} {best.value:.6g} with {best.params}")
            importances = _importances(study)
            if importances:
                results["importances"] = importances
                log.info("Parameter importances: " + ", ".join(f"{k} {v:.3f}" for k, v in importances.items()))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # no trial made it when the study lives elsewhere, all done
        write_text_atomically(sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(OmegaConf.create(results)))
        trials_figure(study, objective).savefig(sweep_dir / "trials.png", dpi=100)
        log.info(f"Trials: {results['trials']}; plot: {sweep_dir / 'trials.png'}")


def _job_overrides(params: dict, fixed: list[str], number: int, url: str) -> list[str]:
    """The overrides of a trial's job: its parameters, the fixed ones, and where it finds its trial."""
    from hydra_plugins.ttt_search._search_space import quoted, trial_overrides

    return [*trial_overrides(params), *fixed, f"hydra.sweeper.trial={number}", f"hydra.sweeper.storage={quoted(url)}"]


class SweeperLock:
    """One sweeper per study. The lock is a file created atomically (O_CREAT | O_EXCL, which shared file systems
    honour) holding the sweeper's host, pid and start; a daemon thread refreshes its mtime, a heartbeat. Another
    sweeper refuses to start while it is held, and takes it over once its heartbeat is older than STALE_S or its
    process is gone from this host (a sweeper killed with SIGKILL cannot release it)."""

    HEARTBEAT_S, STALE_S = 10.0, 60.0

    def __init__(self, path: Path, study_name: str) -> None:
        self.path, self.study_name = path, study_name
        since = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since})
        self._stopped = threading.Event()

    def acquire(self) -> None:
        from trainer.search import StorageError

        while not self._created():
            seen = self._read()
            if seen is None:  # released meanwhile
                continue
            record, mtime = seen
            holder = _holder(record)
            if not self._gone(holder, mtime):
                raise StorageError(
                    f"study {self.study_name} is being searched by another sweeper ({_who(holder)}; lock {self.path}):"
                    " one sweeper per study"
                )
            log.warning(f"Taking over the lock {self.path} of a sweeper that is gone ({_who(holder)})")
            self._remove_if_still(record)
        threading.Thread(target=self._beat, name="sweeper-lock-heartbeat", daemon=True).start()

    def release(self) -> None:
        self._stopped.set()
        seen = self._read()
        if seen is not None and seen[0] == self.record:
            self.path.unlink(missing_ok=True)

    def _created(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as lock:
            lock.write(self.record)
        return True

    def _read(self) -> tuple[str, float] | None:
        """The lock's record and mtime; None when there is no lock."""
        try:
            return self.path.read_text(errors="replace"), self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def _gone(self, holder: dict, mtime: float) -> bool:
        if time.time() - mtime > self.STALE_S:
            return True
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)

    def _remove_if_still(self, record: str) -> None:
        """Remove the lock if it still holds `record`: moved aside atomically, and put back if another sweeper had
        taken it over meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another sweeper removed it first
            return
        if aside.read_text(errors="replace") != record:
            with suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink()

    def _beat(self) -> None:
        while not self._stopped.wait(self.HEARTBEAT_S):
            with suppress(OSError):
                os.utime(self.path)


def _lock_of(url: str, study_name: str, sweep_dir: Path) -> SweeperLock:
    """The lock of a study: beside its journal, or in the sweep directory for a database; its folder made."""
    from trainer.search import is_journal, make_folder

    name = quote(study_name, safe="")
    if is_journal(url):
        path, what = Path(f"{url}.{name}.sweeper"), f"hydra.sweeper.storage {url}"
    else:
        path, what = sweep_dir / f"{name}.sweeper", "hydra.sweep.dir"
    make_folder(path.parent, what)
    return SweeperLock(path, study_name)


def _holder(record: str) -> dict:
    """A lock's record; empty when it is not one (a sweeper killed between creating and writing it)."""
    try:
        holder = json.loads(record)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _who(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _outcome(trial) -> str:
    """One line on how a trial ended."""
    state = trial.state.name.lower()
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        state += f" at step {max(trial.intermediate_values)}"
    if trial.values is not None:
        state += f": {trial.values[0]:.6g}"
    return f"Trial {trial.number} {state} {trial.params}"


def _counted(study) -> int:
    """Trials that count towards n_trials: all that ended, but a failed one that was asked again (`retry_of`)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in trials if t.state in ended and t.number not in retried)


def _retry_interrupted(study) -> None:
    """Trials left running by a sweeper that died (its jobs gone too) fail, and their parameters go back on the
    queue: the next trials asked run them again, in new run directories."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning(f"Trial {trial.number} was left running by an earlier sweeper: failed, asked again")
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def _fail_unfinished(study, trials: list, returns: list) -> dict:
    """Fail the trials whose jobs recorded no end; returns {trial number: its JobReturn, None if none came back}."""
    from optuna.trial import TrialState

    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    failed = {}
    for i, trial in enumerate(trials):
        if trial.number in running:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            failed[trial.number] = returns[i] if i < len(returns) else None
    return failed


def _importances(study) -> dict[str, float] | None:
    """The importance of each parameter that varied (Optuna's default evaluator, PED-ANOVA), over the complete trials
    (at least two, with different values)."""
    from optuna.importance import get_param_importances
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = [p for p in complete[0].params if len({repr(t.params.get(p)) for t in complete}) > 1] if complete else []
    if len(complete) < 2 or not varied or len({t.value for t in complete}) < 2:
        return None
    return {k: float(v) for k, v in get_param_importances(study, params=varied).items()}


def trials_figure(study, objective: str):
    """The objective of each complete trial by its number, the best so far as a line (drawn on to the last trial, so
    that it shows with one complete trial too), pruned trials at their last reported value."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    better = min if study.direction == StudyDirection.MINIMIZE else max
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.scatter([t.number for t in complete], [t.value for t in complete], label="complete", zorder=3)
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        ax.scatter([t.number for t in pruned], last, marker="x", color="grey", label="pruned (last report)")
    if complete:
        best = [complete[0].value]
        for t in complete[1:]:
            best.append(better(best[-1], t.value))
        numbers = [t.number for t in complete] + [trials[-1].number + 0.5]
        ax.step(numbers, best + best[-1:], where="post", color="C1", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial", ylabel=objective, title=f"study {study.study_name} ({study.direction.name.lower()})")
    ax.legend()
    return fig
