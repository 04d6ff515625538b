"""launch/ end to end on CPU: a worker killed under torchrun --max-restarts comes back and resumes on its own; the
Slurm script (with stand-ins for srun and scontrol) saves before its time limit, requeues itself and resumes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
from test_train import metrics

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 40, 5  # ~0.1 s a step on 2 CPU cores: the kill lands a step or two after step-5, long before the end


def _worker(agent: psutil.Process, local_rank: int) -> psutil.Process | None:
    """The trainer.train process torchrun runs as `local_rank`, if there is one."""
    for child in agent.children(recursive=True):
        try:
            if "trainer.train" in child.cmdline() and child.environ().get("LOCAL_RANK") == str(local_rank):
                return child
        except psutil.Error:  # gone, or a zombie, between listing and reading it
            continue
    return None


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the agent and every worker: torchrun starts each worker in a session of its own."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    os.killpg(proc.pid, signal.SIGKILL)
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=10)


def test_killed_worker_is_restarted_and_resumes_from_the_latest_checkpoint(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    env = {**os.environ, "NPROC": "2", "MAX_RESTARTS": "1", "RUN_DIR": str(run_dir), "WANDB_SILENT": "true"}
    args = ["experiment=smoke", f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "logging.wandb.mode=disabled",
            "parallel.cp=2"]  # fmt: skip

    def fail(why: str) -> AssertionError:
        return AssertionError(f"{why}; launcher output:\n{log.read_text()[-4000:]}")

    def wait_for(condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := condition():
                return found
            if proc.poll() is not None:
                raise fail(f"the launcher exited ({proc.returncode}) before {what}")
            time.sleep(0.05)
        raise fail(f"no {what} after {timeout} s")

    with log.open("w") as out:
        proc = subprocess.Popen([REPO / "launch" / "single_node.sh", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            wait_for((run_dir / "checkpoints" / f"step-{EVERY}" / "meta.json").exists, 90, f"checkpoint step-{EVERY}")
            agent = psutil.Process(proc.pid)  # the script execs torchrun: this is the elastic agent
            victim = wait_for(lambda: _worker(agent, local_rank=1), 10, "worker with LOCAL_RANK=1")
            assert len(metrics(run_dir)) < STEPS, "the run finished before a worker could be killed"
            victim.kill()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise fail("the job did not finish within 60 s of the kill") from None
        finally:
            if proc.poll() is None:
                _kill_all(proc)
    output = log.read_text()
    if proc.returncode != 0:
        raise fail(f"the launcher exited with {proc.returncode}")
    resumed = re.search(r"resumed from \S+/step-(\d+) at step (\d+)", output)
    assert resumed, output[-4000:]
    assert resumed[1] == resumed[2] and EVERY <= int(resumed[2]) < STEPS
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, STEPS + 1))  # the redone steps replace the old
    assert (run_dir / "checkpoints" / f"step-{STEPS}" / "meta.json").exists()


def _fake_slurm(bin_dir: Path, log: Path) -> None:
    """`srun` that runs its command once, as node 0 (signals reach it directly: it execs), and `scontrol` that
    names this machine the job's only node and records what else it is asked."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexport SLURM_NODEID=0\nexec "$@"\n'
    )
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\nif [[ "$1" == show ]]; then echo localhost; else echo "$@" >> {log}; fi\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)


def test_sbatch_saves_before_the_time_limit_and_requeues_itself(tmp_path):
    """Slurm's --requeue does not bring a job back from its time limit: on the SIGUSR1 that --signal=B:USR1@120
    sends the batch script, it has the trainer save, then requeues the job; the requeued job resumes."""
    run_dir, log, requeued = tmp_path / "run", tmp_path / "job.log", tmp_path / "scontrol.log"
    _fake_slurm(tmp_path / "bin", requeued)
    with socket.socket() as probe:  # a free port for the job's rendezvous
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "NPROC": "2", "MASTER_PORT": str(port),
           "RUN_DIR": str(run_dir), "WANDB_SILENT": "true"}  # fmt: skip
    args = ["experiment=smoke", f"train.steps={STEPS}", "checkpoint.every=100", "logging.wandb.mode=disabled"]
    script = [str(REPO / "launch" / "slurm.sbatch"), *args]
    with log.open("w") as out:
        job = subprocess.Popen(script, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 2):
                assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.05)
            job.send_signal(signal.SIGUSR1)  # what Slurm does 120 s before the time limit
            job.wait(timeout=90)
        finally:
            if job.poll() is None:
                _kill_all(job)
    assert requeued.read_text().splitlines() == ["requeue 4242"], log.read_text()[-4000:]
    (saved,) = (p.name for p in (run_dir / "checkpoints").iterdir())
    assert saved == f"step-{len(metrics(run_dir))}" and len(metrics(run_dir)) < STEPS
    # Slurm runs the requeued job's script again, with the same job id: it resumes from that checkpoint.
    again = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resumed from {run_dir}/checkpoints/{saved} at step {saved.split('-')[1]}" in again.stderr
    assert [row["step"] for row in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert requeued.read_text().splitlines() == ["requeue 4242"]  # a job that ends in time is not requeued
