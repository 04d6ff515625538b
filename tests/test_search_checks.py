"""A search that a typo or a torn file cannot hurt (docs/search.md, "Checked before the first trial"): bad settings
are one line and exit code 2 before any trial starts and before the study is written to; a journal's torn end is
cut back to its last complete record; one sweeper per study. Most run `ttt-train -m` in this process, with a study
that has nothing left to run, so that no trial trains; one runs a trial through the real command line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from test_search import TRIAL, trials_of
from test_train import cli

import trainer.train
from hydra_plugins.ttt_search.optuna_sweeper import SweeperLock, trials_figure
from trainer.search import JOURNAL, StorageError, open_storage

STUDY = "ttt-search"  # experiment=search's
SPACE = {  # experiment=search's
    "ttt.lr": FloatDistribution(0.1, 10.0, log=True),
    "optim.lr": FloatDistribution(3e-4, 3e-2, log=True),
    "ttt.chunk_size": CategoricalDistribution([16, 32, 64]),
}
PARAMS = {"ttt.lr": 1.0, "optim.lr": 1e-3, "ttt.chunk_size": 16}


def finished_study(path: Path, trials: int = 1) -> bytes:
    """A journal holding experiment=search's study with `trials` complete trials; returns its bytes."""
    study = optuna.create_study(storage=open_storage(str(path)), study_name=STUDY, direction="minimize")
    for n in range(trials):
        study.add_trial(create_trial(params=PARAMS, distributions=SPACE, value=5.0 - n))
    return path.read_bytes()


def search(monkeypatch, capsys, sweep: Path, *overrides: str) -> tuple[int, str, list[str]]:
    """`ttt-train -m experiment=search` (3-step trials, the loss) in this process: its exit code, stdout and the
    lines of its stderr."""
    argv = ["ttt-train", "-m", *TRIAL, "logging.wandb.mode=disabled", f"hydra.sweep.dir={sweep}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        trainer.train.main()
        code = 0
    except SystemExit as stopped:
        code = stopped.code
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def refused(monkeypatch, capsys, sweep: Path, *overrides: str) -> str:
    """The one line a refused search prints, once its exit code is checked and that no trial started."""
    code, _, err = search(monkeypatch, capsys, sweep, *overrides)
    assert code == 2, err
    (line,) = err
    assert line.startswith("error: "), line
    assert not (sweep / "0").exists()
    return line


@pytest.mark.parametrize(
    "override,message",
    [
        ("hydra.sweeper.n_trials=0", "error: hydra.sweeper.n_trials must be an integer >= 1, got 0"),
        ("hydra.sweeper.n_trials=-3", "error: hydra.sweeper.n_trials must be an integer >= 1, got -3"),
        ("hydra.sweeper.n_jobs=0", "error: hydra.sweeper.n_jobs must be an integer >= 1, got 0"),
        ("hydra.sweeper.n_jobs=-1", "error: hydra.sweeper.n_jobs must be an integer >= 1, got -1"),
        ("hydra.sweeper.report_every=0", "error: hydra.sweeper.report_every must be an integer >= 1, got 0"),
        ("hydra.sweeper.max_failure_rate=1.5", "error: hydra.sweeper.max_failure_rate must be in [0, 1], got 1.5"),
        ("optim.lr=interval(1e-2, 1e-4)",
         "error: optim.lr=interval(1e-2, 1e-4): `low <= high` must hold, but got (low=0.01, high=0.0001)."),
        ("ttt.lr=tag(log, interval(0, 1))",
         "error: ttt.lr=tag(log, interval(0, 1)): `low > 0` must hold for `log=True`, but got (low=0.0, high=1.0)."),
        ("ttt.lr=range(1, 10, step=0)", "error: ttt.lr=range(1, 10, step=0): a range's step must be positive"),
        ("ttt.lr=glob(*)", "error: ttt.lr=glob(*): not a search space (choice, range, interval, tag)"),
        ("optim.lrr=tag(log, interval(1e-4, 1e-2))",
         "error: Could not override 'optim.lrr'. To append to your config use +optim.lrr=0.0001 (a trial with "
         "ttt.lr=0.1 optim.lr=0.0003 ttt.chunk_size=16 optim.lrr=0.0001)"),
        ("+hydra.sweeper.params={optim.lrr: 0.1}", "error: Could not override 'optim.lrr'."),
        ("ttt.chunk_size=choice(16, 48)",
         "error: data.seq_len must be a multiple of parallel.cp x ttt.chunk_size = 48, got 64 (a trial with "
         "ttt.lr=0.1 optim.lr=0.0003 ttt.chunk_size=48)"),
        ("model=choice(tiny, tinyy)", "error: In 'config': Could not find 'model/tinyy' (a trial with "),
        ("optim.lr=choice(0.1, -1)", "error: optim.lr must be a positive number, got -1 (a trial with "),
    ],
    ids=["n_trials=0", "n_trials<0", "n_jobs=0", "n_jobs<0", "report_every=0", "max_failure_rate", "low>high",
         "log-from-0", "step=0", "glob", "typo", "typo-in-params", "chunk-size", "group-option", "refused-value"],
)  # fmt: skip
def test_a_bad_setting_stops_the_search_before_its_study_exists(tmp_path, monkeypatch, capsys, override, message):
    sweep = tmp_path / "sweep"
    assert refused(monkeypatch, capsys, sweep, override).startswith(message)
    assert not sweep.exists()  # no study, no lock, no submitit folder


def test_legitimate_overrides_pass_the_checks(tmp_path, monkeypatch, capsys):
    """Added and deleted keys and config group options are checked as the job takes them: a study with nothing
    left to run then ends normally, and is not written to."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    journal = finished_study(sweep / JOURNAL)
    code, out, err = search(
        monkeypatch, capsys, sweep, "+train.note=choice(a, b)", "~logging.wandb.tags", "ttt=ntp", "model=tiny",
        "data.seq_len=choice(64, 128)", "hydra.sweeper.n_trials=1",
    )  # fmt: skip
    assert code == 0, err
    assert "1 of 1 trials ended; the search is complete (raise hydra.sweeper.n_trials to extend it)" in out
    assert (sweep / JOURNAL).read_bytes() == journal  # no second create-study record
    assert not (sweep / "0").exists()


def test_a_study_stored_elsewhere_with_nothing_left_to_run_is_summarized(tmp_path, monkeypatch, capsys):
    """hydra.sweeper.storage outside the sweep directory, all trials done: the results go to a sweep directory that
    no trial made, and the journal is not written to."""
    storage, sweep = tmp_path / "studies" / "s.journal", tmp_path / "sweep"
    storage.parent.mkdir()
    journal = finished_study(storage, trials=2)
    code, out, err = search(monkeypatch, capsys, sweep, f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=2")
    assert code == 0, err
    assert f"Study {STUDY} in {storage}: 2 of 2 trials ended; the search is complete" in out
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_trial"] == 1 and results["trials"] == {"complete": 2}
    assert (sweep / "trials.png").exists() and storage.read_bytes() == journal
    assert sorted(p.name for p in storage.parent.iterdir()) == ["s.journal"]  # the lock released


def test_a_storage_whose_folder_cannot_be_made_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    storage = tmp_path / "file" / "sub" / "s.journal"
    line = refused(monkeypatch, capsys, tmp_path / "sweep", f"hydra.sweeper.storage={storage}")
    assert line.startswith(f"error: hydra.sweeper.storage {storage}: cannot create the folder {storage.parent} ("), line


@pytest.mark.parametrize("damage", ["torn", "junk"])
def test_a_torn_or_junk_end_of_the_journal_is_cut_back(tmp_path, monkeypatch, capsys, damage):
    """A crash while writing tears the journal's last line; junk may be appended. Either is cut back to the last
    complete record, the original kept beside it, with one line saying so; the trials before it are kept."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    journal = finished_study(sweep / JOURNAL, trials=2)
    last = journal.splitlines(keepends=True)[-1]  # trial 1
    damaged = journal[:-40] if damage == "torn" else journal + b"junk\n"
    (sweep / JOURNAL).write_bytes(damaged)
    code, out, err = search(monkeypatch, capsys, sweep, "hydra.sweeper.n_trials=1")
    assert code == 0, err
    (copy,) = sweep.glob(f"{JOURNAL}.torn-*")
    assert copy.read_bytes() == damaged
    kept = journal[: -len(last)] if damage == "torn" else journal
    assert (sweep / JOURNAL).read_bytes() == kept
    (said,) = [line for line in out.splitlines() if "cut the" in line]
    assert said.endswith(
        f"{sweep / JOURNAL}: cut the {len(damaged) - len(kept)} bytes after its last complete record (a write torn by "
        f"a crash, or junk appended); the original is kept as {copy}"
    )
    assert [t.value for t in trials_of(sweep)] == ([5.0] if damage == "torn" else [5.0, 4.0])


def test_a_torn_trial_end_is_run_again_and_the_search_goes_on(tmp_path):
    """`truncate -s -40` on the journal a search left: the record of trial 1's end was torn. The next run cuts it,
    keeps trial 0, fails trial 1 (left running, as far as the journal knows) and runs its parameters again."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    study = optuna.create_study(storage=open_storage(str(sweep / JOURNAL)), study_name=STUDY, direction="minimize")
    study.add_trial(create_trial(params=PARAMS, distributions=SPACE, value=5.0))
    study.tell(study.ask(SPACE), 4.0)
    asked = study.trials[1].params
    journal = (sweep / JOURNAL).read_bytes()
    torn = len(journal.splitlines(keepends=True)[-1]) - 40  # what is left of trial 1's end
    os.truncate(sweep / JOURNAL, len(journal) - 40)
    result = cli("-m", *TRIAL, "logging.wandb.mode=disabled", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}")
    trials = trials_of(sweep)
    assert [(t.state, t.value) for t in trials[:2]] == [(TrialState.COMPLETE, 5.0), (TrialState.FAIL, None)]
    assert trials[2].state == TrialState.COMPLETE and trials[2].params == asked
    assert trials[2].user_attrs == {"retry_of": 1} and (sweep / "2" / "metrics.jsonl").exists()
    assert result.stdout.count(f"cut the {torn} bytes after its last complete record") == 1
    assert (sweep / JOURNAL).read_bytes().startswith(journal[: len(journal) - 40 - torn])
    (copy,) = sweep.glob(f"{JOURNAL}.torn-*")
    assert copy.read_bytes() == journal[:-40]
    assert "1 of 2 trials ended" in result.stdout


def test_a_second_sweeper_on_a_study_refuses_and_leaves_it_alone(tmp_path, monkeypatch, capsys):
    """The lock of a live sweeper (this process, on this host, its heartbeat fresh): the second refuses with one
    line naming it, writes nothing to the study and fails none of its trials."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    journal = finished_study(sweep / JOURNAL)
    lock = SweeperLock(sweep / f"{JOURNAL}.{STUDY}.sweeper", STUDY)
    lock.acquire()
    try:
        line = refused(monkeypatch, capsys, sweep, "hydra.sweeper.n_trials=2")
    finally:
        lock.release()
    assert line == (
        f"error: study {STUDY} is being searched by another sweeper (host {socket.gethostname()}, pid {os.getpid()}, "
        f"since {json.loads(lock.record)['since']}; lock {lock.path}): one sweeper per study"
    )
    assert (sweep / JOURNAL).read_bytes() == journal and not lock.path.exists()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    "host,age", [(socket.gethostname(), 0), ("elsewhere", 61)], ids=["process-gone", "heartbeat-stopped"]
)
def test_the_lock_of_a_sweeper_that_is_gone_is_taken_over(tmp_path, caplog, host, age):
    path = tmp_path / "study.sweeper"
    path.write_text(json.dumps({"host": host, "pid": _dead_pid() if host == socket.gethostname() else 1, "since": "t"}))
    holder = json.loads(path.read_text())
    os.utime(path, (time.time() - age, time.time() - age))
    lock = SweeperLock(path, "s")
    lock.acquire()
    try:
        assert path.read_text() == lock.record
        assert caplog.messages == [
            f"Taking over the lock {path} of a sweeper that is gone (host {host}, pid {holder['pid']}, since t)"
        ]
    finally:
        lock.release()
    assert not path.exists()


def test_a_held_lock_keeps_its_heartbeat_and_refuses_others(tmp_path, monkeypatch):
    monkeypatch.setattr(SweeperLock, "HEARTBEAT_S", 0.05)
    path = tmp_path / "study.sweeper"
    held = SweeperLock(path, "s")
    held.acquire()
    try:
        os.utime(path, (time.time() - 50, time.time() - 50))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 5  # the heartbeat refreshed it
        with pytest.raises(StorageError, match=r"^study s is being searched by another sweeper \(host "):
            SweeperLock(path, "s").acquire()
        assert path.read_text() == held.record
    finally:
        held.release()
    assert not path.exists()


def test_the_best_so_far_line_shows_with_one_complete_trial():
    study = optuna.create_study()
    study.add_trial(create_trial(params={}, distributions={}, value=1.0))
    (line,) = trials_figure(study, "loss").axes[0].get_lines()
    xs, ys = line.get_data()
    assert max(xs) > min(xs) and list(ys) == [1.0, 1.0]
