"""Sweeps on a cluster (README, "Sweeps on a cluster"): Slurm job environments -> ranks and rendezvous, the
sbatch script the Slurm launcher writes, sweeps of CP=2 jobs through submitit's local executor (each point a
job whose tasks are its ranks), a requeue after the pre-timeout signal, the returned objective (the search that
uses it: tests/test_search.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest
import submitit.slurm.slurm
from conftest import training_numbers
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from test_train import cli, compose_job, metrics, wandb_history_file

import trainer.train
from trainer.cluster import MASTER_PORTS, default_resume, join_job_ranks, preemption_signals
from trainer.compose import CONF_DIR
from trainer.config import ConfigError
from trainer.tracking import last_recorded

TINY = ["experiment=smoke", "data.seq_len=64", "ttt.chunk_size=16", "eval.samples=4"]  # CP=2: 16-token pieces
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def slurm_task(job_id: str, procid: int, localid: int, array_task: str | None = None) -> dict[str, str]:
    """What Slurm and submitit's sbatch set for task `procid` of a 2-node job of 8 tasks per node."""
    env = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": job_id, "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": str(procid // 8), "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
        "SLURM_JOB_NODELIST": "gpu-[07-08]",
    }  # fmt: skip
    if array_task is not None:
        env.update(SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID=array_task)
    return env


def exported(monkeypatch, env: dict[str, str]) -> dict[str, str]:
    """The env:// variables `join_job_ranks` exports in a process whose environment is `env` (written into a
    copy of os.environ, which the test's end restores)."""
    monkeypatch.setattr(os, "environ", {"PATH": os.environ["PATH"], **env})
    join_job_ranks()
    return {key: os.environ[key] for key in RENDEZVOUS if key in os.environ}


def test_slurm_task_environment_maps_to_ranks_and_rendezvous(monkeypatch):
    task = exported(monkeypatch, slurm_task("4242", procid=9, localid=1))
    assert {k: v for k, v in task.items() if k != "MASTER_PORT"} == {
        "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu-07",
    }  # fmt: skip
    assert int(task["MASTER_PORT"]) in MASTER_PORTS
    first = exported(monkeypatch, slurm_task("4242", procid=0, localid=0))
    assert (first["RANK"], first["MASTER_ADDR"], first["MASTER_PORT"]) == ("0", "gpu-07", task["MASTER_PORT"])
    # The points of a sweep are tasks of a job array: each its own port, in case they share a node.
    points = {exported(monkeypatch, slurm_task("4243", 0, 0, array_task=a))["MASTER_PORT"] for a in "0123"}
    assert len(points) == 4
    assert preemption_signals() == (signal.SIGUSR2,)  # submitit's sbatch asks for --signal=USR2@<delay>
    # A job the scheduler may requeue continues from its checkpoints unless told which one to read.
    assert (default_resume(None), default_resume("/ckpt/step-3")) == ("auto", "/ckpt/step-3")


def test_local_executor_task_environment_and_single_task_jobs(monkeypatch):
    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "777", "SUBMITIT_LOCAL_NTASKS": "2",
             "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0"}  # fmt: skip
    task = exported(monkeypatch, {**local, "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"})
    assert (task["RANK"], task["WORLD_SIZE"], task["LOCAL_RANK"]) == ("1", "2", "1")
    assert task["MASTER_ADDR"] == socket.gethostname()
    # One task: nothing to join (the job self-launches parallel.nproc_per_node workers, as outside submitit).
    assert exported(monkeypatch, {**slurm_task("4244", 0, 0), "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1"}) == {}
    assert exported(monkeypatch, {}) == {} and preemption_signals() == () and default_resume(None) is None


def test_slurm_launcher_submits_one_array_of_multi_node_jobs(tmp_path, monkeypatch):
    """The sbatch script `hydra/launcher=slurm` submits for a 2-point sweep (fake sbatch and srun on PATH)."""
    bin_dir, captured = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {captured}\necho "Submitted batch job 4242"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(submitit.slurm.slurm.SlurmJob, "results", lambda job: ["not waited for"])
    overrides = ["hydra/launcher=slurm", "hydra.launcher.nodes=4", "hydra.launcher.partition=gpu",
                 "hydra.launcher.account=proj", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        config = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher = instantiate(config.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=config)
    launcher.launch([["ttt.lr=0.5"], ["ttt.lr=2.0"]], initial_job_idx=0)
    flags = {line for line in captured.read_text().splitlines() if line.startswith("#SBATCH")}
    for flag in ("--array=0-1%2", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8",
                 "--time=1440", "--partition=gpu", "--account=proj", "--signal=USR2@120", "--requeue"):  # fmt: skip
        assert f"#SBATCH {flag}" in flags, sorted(flags)


def point_results(sweep: Path) -> dict[str, list]:
    """Run directory -> what each task of its submitit job returned (task order), from submitit's result files."""
    returned = {}
    for job in (sweep / ".submitit").iterdir():
        results = sorted(job.glob("*_result.pkl"))
        if results:
            tasks = [cloudpickle.loads(path.read_bytes()) for path in results]
            assert all(outcome == "success" for outcome, _ in tasks), tasks
            returned[tasks[0][1].hydra_cfg.hydra.runtime.output_dir] = [ret.return_value for _, ret in tasks]
    return returned


def test_local_jobs_sweep_runs_each_cp2_point_as_a_job_of_two_ranks(tmp_path):
    sweep = tmp_path / "sweep-c2d9"
    cli("-m", "hydra/launcher=local_jobs", *TINY, "train.steps=3", "objective=loss,accuracy",
        f"hydra.sweep.dir={sweep}")  # fmt: skip
    returned = point_results(sweep)
    assert sorted(returned) == [str(sweep / "0"), str(sweep / "1")]  # two jobs, one per point
    run_ids = set()
    for point, metric in (("0", "loss"), ("1", "eval/accuracy")):
        run_dir = sweep / point
        rows = metrics(run_dir)
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert all(r["tokens"] == 64 * r["step"] for r in rows)  # CP=2 over the job's 2 ranks: one sequence a step
        assert (run_dir / "checkpoints" / "step-3" / "meta.json").exists()
        # Each job is 2 submitit tasks (ranks 0 and 1); rank 0 returns the objective, read from metrics.jsonl.
        assert returned[str(run_dir)] == [rows[-1][metric], None]
        history = wandb_history_file(run_dir)
        run_ids.add(history.parent.name.rsplit("-", 1)[-1])
        assert b"sweep-c2d9" in history.read_bytes()  # the sweep is the W&B group
    assert len(run_ids) == 2
    # the same training: only what the app returns differs
    assert training_numbers(metrics(sweep / "0")) == training_numbers(metrics(sweep / "1"))


def _job_tasks(driver: psutil.Process) -> list[psutil.Process]:
    """The task processes of the submitit local job the sweep's driver started."""
    for proc in driver.children(recursive=True):
        try:
            if "submitit.local._local" in " ".join(proc.cmdline()):
                return proc.children()
        except psutil.Error:
            continue
    return []


def test_signal_before_the_time_limit_saves_then_the_requeued_job_resumes(tmp_path):
    """What the local executor does `signal_delay_s` before `timeout_min`, and Slurm before a job's time limit:
    SIGUSR2 to every task. The job saves, submitit requeues it, and it resumes in the same run directory
    (without checkpoint.resume=auto on the command line: a submitit job resumes by default)."""
    sweep, log, steps = tmp_path / "sweep", tmp_path / "driver.log", 40
    args = ["-m", "hydra/launcher=local_jobs", *TINY, f"train.steps={steps}", "checkpoint.every=100", "eval.every=0",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "trainer.train", *args], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "WANDB_SILENT": "true"})  # fmt: skip
        try:
            deadline = time.monotonic() + 150
            while not ((sweep / "0" / "metrics.jsonl").exists() and len(metrics(sweep / "0")) >= 3):
                assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            tasks = _job_tasks(psutil.Process(driver.pid))
            assert len(tasks) == 2 and len(metrics(sweep / "0")) < steps
            for task in tasks:
                task.send_signal(signal.SIGUSR2)
            assert driver.wait(timeout=150) == 0, log.read_text()[-3000:]
        finally:
            if driver.poll() is None:
                driver.kill()
    run_dir = sweep / "0"
    (job,) = (sweep / ".submitit").glob("[0-9]*")
    rank0 = (job / f"{job.name}_0_log.err").read_text()
    saved = int(re.search(r"preempted: saved \S+/step-(\d+), exiting", rank0)[1])
    assert f"resumed from {run_dir}/checkpoints/step-{saved} at step {saved}" in rank0
    assert f"Requeued job {job.name}" in (job / f"{job.name}_0_log.out").read_text()
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and saved < steps
    assert point_results(sweep) == {str(run_dir): [rows[-1]["loss"], None]}
    runs = sorted(run_dir.glob("wandb/offline-run-*"))  # one W&B run, continued after the requeue
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[-1] for r in runs}) == 1


def test_the_objective_is_the_last_loss_or_accuracy(tmp_path):
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "eval/accuracy": 0.25}, {"step": 3, "loss": 2.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert last_recorded(path, "loss") == 2.0
    assert last_recorded(path, "eval/accuracy") == 0.25
    assert last_recorded(path, "eval/perplexity") is None
    assert compose_job().objective == "loss"
    assert compose_job("objective=accuracy").objective == "accuracy"  # the default task evaluates (eval.every=auto)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["objective=best"], "objective must be one of loss, accuracy, got 'best'"),
        (["objective=accuracy", "eval.every=0"],
         "objective must be loss when the run does not evaluate (eval.every=0 or data=corpus), got 'accuracy'"),
    ],
)  # fmt: skip
def test_bad_objective_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        compose_job(*overrides)
    assert str(error.value) == message


def test_a_search_that_goes_the_wrong_way_is_refused(tmp_path, monkeypatch, capsys):
    argv = ["ttt-train", "experiment=search", "objective=loss", f"hydra.run.dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        trainer.train.main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: hydra.sweeper.direction must be minimize for objective=loss, got 'maximize'"
    ]


def test_a_launcher_without_its_plugin_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(trainer.train, "_installed", lambda module: False)
    monkeypatch.setattr(sys, "argv", ["ttt-train", "-m", "hydra/launcher=slurm", "ttt.lr=0.5,1.0"])
    with pytest.raises(SystemExit) as stopped:
        trainer.train.cli()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        'error: hydra/launcher=slurm needs the hydra-submitit-launcher plugin: pip install -e ".[cluster]"'
    ]
