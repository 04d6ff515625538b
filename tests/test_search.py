"""Search (docs/search.md): the Optuna sweeper of hydra_plugins/ttt_search over a study on disk. Trials side by side
through local_jobs, a search whose launching process is killed and run again, a pruned trial, bad storage files,
and the search-space syntax."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from test_cluster import TINY, point_results
from test_train import cli, metrics, wandb_history_file

import trainer.train
from hydra_plugins.ttt_search._search_space import SearchSpaceError, edge_points, parse_search_space, trial_overrides
from trainer.search import JOURNAL, open_storage

SEARCHED = ("ttt.lr", "optim.lr", "ttt.chunk_size")  # experiment=search's parameters
# experiment=search on the smallest job: one process, 3 steps, the training loss as the objective.
TRIAL = ["experiment=search", "parallel=single", "train.steps=3", "data.seq_len=64", "eval.every=0",
         "train.progress=false", "objective=loss", "hydra.sweeper.direction=minimize"]  # fmt: skip


def trials_of(sweep: Path, study: str = "ttt-search") -> list:
    return optuna.load_study(study_name=study, storage=open_storage(str(sweep / JOURNAL))).get_trials()


def searched(run_dir: Path) -> dict[str, str]:
    """The searched parameters a trial's job ran with, from its overrides."""
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    return dict(o.split("=", 1) for o in overrides if o.split("=")[0] in SEARCHED)


def span(run_dir: Path) -> tuple[float, float]:
    """When a trial's job started (Hydra wrote its config) and when it last wrote a metric."""
    return (run_dir / ".hydra" / "config.yaml").stat().st_mtime, (run_dir / "metrics.jsonl").stat().st_mtime


def test_four_trials_two_at_a_time_through_local_jobs(tmp_path):
    sweep = tmp_path / "search-4a"
    cli("-m", *TRIAL, "hydra/launcher=local_jobs", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
        f"hydra.sweep.dir={sweep}")  # fmt: skip
    trials = trials_of(sweep)
    assert [(t.number, t.state) for t in trials] == [(n, TrialState.COMPLETE) for n in range(4)]
    returned = point_results(sweep)  # each trial a submitit job, in <sweep dir>/<trial number>
    assert sorted(returned) == [str(sweep / str(n)) for n in range(4)]
    for t in trials:
        run_dir = sweep / str(t.number)
        assert searched(run_dir) == {k: str(v) for k, v in t.params.items()}
        assert t.value == metrics(run_dir)[-1]["loss"] == returned[str(run_dir)][0]
        history = wandb_history_file(run_dir).read_bytes()  # the sweep's W&B group; the trial in the run's config
        assert b"search-4a" in history and f'"trial":{t.number}'.encode() in history
    assert len({tuple(t.params.values()) for t in trials}) == 4
    # Two at a time: trials 0 and 1 overlapped, and 2 and 3 started once both had ended.
    (start0, end0), (start1, end1), (start2, _), (start3, _) = (span(sweep / str(n)) for n in range(4))
    assert start0 < end1 and start1 < end0 and min(start2, start3) > max(end0, end1)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(t.value for t in trials) and best["trials"] == {"complete": 4}
    assert best["best_params"] == trials[best["best_trial"]].params
    assert set(best["importances"]) <= set(SEARCHED) and abs(sum(best["importances"].values()) - 1) < 1e-6
    assert (sweep / "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert not (sweep / ".submitit" / "%j").exists()  # submitit's empty folder template
    assert not (sweep / f"{JOURNAL}.ttt-search.sweeper").exists()  # the lock released


def test_a_killed_search_resumes_without_repeating_its_finished_trials(tmp_path):
    """SIGKILL to `ttt-train -m` (the basic launcher: trials run in its process) once trial 2 started; the same
    command again keeps trials 0 and 1, fails trial 2 and runs its parameters again as trial 3, then trial 4."""
    sweep, log = tmp_path / "search", tmp_path / "first.log"
    args = ["-m", *TRIAL, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=1",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "trainer.train", *args], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "WANDB_SILENT": "true"})  # fmt: skip
        try:
            deadline = time.monotonic() + 200
            while not (sweep / "2" / ".hydra" / "config.yaml").exists():  # Hydra starts trial 2's job
                assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    before = trials_of(sweep)
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]
    finished = {n: ((sweep / n / "metrics.jsonl").read_bytes(), span(sweep / n)) for n in "01"}

    result = cli(*args)
    trials = trials_of(sweep)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert [(t.params, t.value) for t in trials[:2]] == [(t.params, t.value) for t in before[:2]]
    assert {n: ((sweep / n / "metrics.jsonl").read_bytes(), span(sweep / n)) for n in "01"} == finished  # not rerun
    assert trials[3].params == before[2].params and trials[3].user_attrs == {"retry_of": 2}
    assert [len(metrics(sweep / n)) for n in "34"] == [3, 3]
    # The sampler goes on instead of starting over: with its seed as it was, trial 4 would be trial 0 again.
    assert trials[4].params not in [t.params for t in trials[:4]]
    assert "Trial 2 was left running by an earlier sweeper: failed, asked again" in result.stdout
    assert f"Taking over the lock {sweep / JOURNAL}.ttt-search.sweeper of a sweeper that is gone (" in result.stdout
    assert f"Study ttt-search in {sweep / JOURNAL}: 2 of 4 trials ended\n" in result.stdout
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["trials"] == {"complete": 4, "fail": 1}


def test_a_pruned_trial_stops_early_with_a_checkpoint(tmp_path):
    """A CP=2 job (two ranks) reports its loss every 2 steps; the threshold pruner stops it at the first report."""
    sweep = tmp_path / "prune"
    result = cli("-m", "hydra/sweeper=optuna", "hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.upper=0",
                 "hydra.sweeper.report_every=2", "hydra.sweeper.n_trials=1", *TINY, "ttt.lr=interval(0.5, 1.0)",
                 f"hydra.sweep.dir={sweep}")  # fmt: skip
    (trial,) = trials_of(sweep, study="search")
    rows = metrics(sweep / "0")
    assert trial.state == TrialState.PRUNED and len(rows) == 2 < 6  # experiment=smoke: train.steps=6
    assert trial.intermediate_values == {2: rows[-1]["loss"]} and trial.value == rows[-1]["loss"]
    assert (sweep / "0" / "checkpoints" / "step-2" / "meta.json").exists()
    assert f"trial 0 pruned at step 2 (loss {rows[-1]['loss']:.6g})" in result.stderr
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["trials"] == {"pruned": 1}


def _journal(path: Path, direction: str = "minimize") -> None:
    """A journal holding one study named `search` with one complete trial."""
    study = optuna.create_study(storage=open_storage(str(path)), study_name="search", direction=direction)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))


def _corrupt(path: Path) -> None:
    _journal(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))


def _foreign(path: Path) -> None:  # somebody's metrics.jsonl
    path.write_text("".join(json.dumps({"step": s, "loss": 2.0}) + "\n" for s in (1, 2)))


@pytest.mark.parametrize(
    "make,message",
    [
        (_foreign, "hydra.sweeper.storage {path}: not an Optuna journal, or a corrupt one (KeyError: 'op_code')"),
        (_corrupt, "hydra.sweeper.storage {path}: not an Optuna journal, or a corrupt one (JSONDecodeError: "),
        (lambda path: path.write_bytes(b"SQLite format 3\x00"), "{path}: not an Optuna journal, or a corrupt one (no"),
        (lambda path: _journal(path, "maximize"), "study search in {path} is to maximize: use another study_name"),
    ],
    ids=["foreign", "corrupt", "binary", "other-direction"],
)  # fmt: skip
def test_a_bad_storage_file_is_one_line(tmp_path, monkeypatch, capsys, make, message):
    path = tmp_path / "study.journal"
    make(path)
    stored = path.read_bytes()
    argv = ["ttt-train", "-m", "hydra/sweeper=optuna", f"hydra.sweeper.storage={path}", "ttt.lr=interval(0.5, 1.0)",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        trainer.train.main()
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    expected = message.format(path=path)
    assert line.startswith("error: ") and expected in line, line
    assert not (tmp_path / "sweep" / "0").exists()
    assert path.read_bytes() == stored and sorted(p.name for p in tmp_path.iterdir()) == ["study.journal"]


def test_search_space_syntax_maps_to_optuna_distributions():
    space, fixed = parse_search_space([
        "ttt.lr=tag(log, interval(0.1, 10.0))", "optim.lr=interval(0.001, 0.01)", "ttt.chunk_size=choice(16, 32, 64)",
        "data.depth=range(1, 10, step=3)", "x=tag(log, int(interval(1, 64)))", "name=choice(a, 'b c')",
        "train.steps=5", "~eval", "ttt.lr=tag(log, interval(0.5, 2.0))",
    ])  # fmt: skip
    assert space == {
        "ttt.lr": FloatDistribution(0.5, 2.0, log=True), "optim.lr": FloatDistribution(0.001, 0.01),
        "ttt.chunk_size": CategoricalDistribution([16, 32, 64]), "data.depth": IntDistribution(1, 7, step=3),
        "x": IntDistribution(1, 64, log=True), "name": CategoricalDistribution(["a", "b c"]),
    }  # fmt: skip
    assert fixed == ["train.steps=5", "~eval"]
    assert trial_overrides({"ttt.lr": 0.5, "name": "b c", "n": 16, "flag": True}) == [
        "ttt.lr=0.5", "name='b c'", "n=16", "flag=true"
    ]  # fmt: skip
    with pytest.raises(SearchSpaceError, match=r"^data.depth=range\(5, 1\): an empty range$"):
        parse_search_space(["data.depth=range(5, 1)"])
    with pytest.raises(SearchSpaceError, match=r"^x=interval\(1, nan\): bounds and steps must be finite numbers$"):
        parse_search_space(["x=interval(1, nan)"])
    with pytest.raises(SearchSpaceError, match=r"^Error parsing override 'x=choice\(\)': ValueError while evaluating"):
        parse_search_space(["x=choice()"])  # as hydra.sweeper.params hands it over, unparsed
    # The first edge of each parameter, then each other edge in turn (ttt.lr last: it was given again last).
    first = {"ttt.lr": 0.5, "optim.lr": 0.001, "ttt.chunk_size": 16, "data.depth": 1, "x": 1, "name": "a"}
    others = [{"optim.lr": 0.01}, {"ttt.chunk_size": 32}, {"ttt.chunk_size": 64}, {"data.depth": 7}, {"x": 64},
              {"name": "b c"}, {"ttt.lr": 2.0}]  # fmt: skip
    assert edge_points(space) == [first, *({**first, **edge} for edge in others)]


def test_a_search_that_goes_the_wrong_way_stops_before_its_study_exists(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    monkeypatch.setattr(
        sys, "argv", ["ttt-train", "-m", "experiment=search", "objective=loss", f"hydra.sweep.dir={sweep}"]
    )
    with pytest.raises(SystemExit) as stopped:
        trainer.train.main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: hydra.sweeper.direction must be minimize for objective=loss, got 'maximize'"
    ]
    assert not (sweep / JOURNAL).exists()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # QMCSampler's
def test_each_sampler_and_pruner_config_builds_and_proposes_a_point():
    """Every config of hydra/sweeper/sampler and hydra/sweeper/pruner the plugin registers builds its Optuna object,
    and each proposes a point of experiment=search's space and takes a report it may prune."""
    import hydra_plugins.ttt_search.optuna_sweeper  # noqa: F401 (registers the configs)

    store = ConfigStore.instance()
    configs = {f"{group}/{name}": store.load(f"hydra/sweeper/{group}/{name}").node
               for group in ("sampler", "pruner") for name in store.list(f"hydra/sweeper/{group}")}  # fmt: skip
    assert sorted(configs) == [
        "pruner/hyperband.yaml", "pruner/median.yaml", "pruner/none.yaml", "pruner/percentile.yaml",
        "pruner/successive_halving.yaml", "pruner/threshold.yaml", "sampler/cmaes.yaml", "sampler/gp.yaml",
        "sampler/qmc.yaml", "sampler/random.yaml", "sampler/tpe.yaml",
    ]  # fmt: skip
    configs["pruner/threshold.yaml"].upper = 1.0  # it needs a bound
    space, _ = parse_search_space([f"{k}=tag(log, interval(0.1, 10.0))" for k in SEARCHED[:2]] + ["n=choice(1, 2)"])
    for name, config in configs.items():
        built = {"sampler": instantiate(config)} if name.startswith("sampler") else {"pruner": instantiate(config)}
        trial = optuna.create_study(direction="maximize", **built).ask(space)
        assert set(trial.params) == {*SEARCHED[:2], "n"}, name
        trial.report(0.5, 1)
        assert trial.should_prune() in (False, True)
