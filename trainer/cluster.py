"""Jobs that a scheduler starts through submitit: `hydra/launcher=slurm` and `hydra/launcher=local_jobs`.

Each sweep point is one job of several tasks (one per GPU, or per local process), and submitit runs the Hydra
app in every task, so each task is one rank. `rendezvous` maps the job's environment, as submitit's
`JobEnvironment` reads it (on Slurm: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST,
SLURM_JOB_ID), to torch.distributed's env:// variables, with the store on the job's first node.

Before a job's time limit (and on preemption, where Slurm is set up to signal it) submitit sends its signal
(SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise). The training loop takes that signal over, saves a
checkpoint after the current step and stops; `leave_preempted` then gives the signal to submitit, which
requeues the job (Slurm: `scontrol requeue`; the local executor restarts the tasks). The requeued job runs in
the same run directory and resumes from its newest checkpoint (`checkpoint.resume` is auto in a submitit job
unless set), continuing the same W&B run.
"""

from __future__ import annotations

import os
import signal
import sys
import zlib

MASTER_PORTS = range(20000, 60000)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a task that stopped for its scheduler leaves no result


def _job_environment():
    """submitit's view of the job this process is a task of; None outside a submitit job."""
    if os.environ.get("SUBMITIT_EXECUTOR") not in ("slurm", "local"):
        return None
    import submitit  # present wherever submitit started this process

    return submitit.JobEnvironment()


def rendezvous(job) -> dict[str, str]:
    """torch.distributed's env:// variables for one task of a submitit job (a `submitit.JobEnvironment`)."""
    return {
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes),
        "MASTER_ADDR": job.hostnames[0],
        # Every task derives the same port, and so does the job after a requeue (same id); the tasks of a job
        # array (a sweep) have ids of their own, so points sharing a node do not share a port.
        "MASTER_PORT": str(MASTER_PORTS[zlib.crc32(job.job_id.encode()) % len(MASTER_PORTS)]),
    }


def join_job_ranks() -> None:
    """In a task of a multi-task submitit job, export its rank and rendezvous, as torchrun does for a worker."""
    job = _job_environment()
    if job is not None and job.num_tasks > 1:
        os.environ.update(rendezvous(job))


def default_resume(resume: str | None) -> str | None:
    """`checkpoint.resume` for this process. A submitit job comes back after a requeue in its own run directory
    and must continue there, not start again over its checkpoints: in such a job an unset value means auto
    (a first start finds no checkpoint and starts fresh)."""
    return "auto" if resume is None and _job_environment() is not None else resume


def preemption_signals() -> tuple[signal.Signals, ...]:
    """The signal a submitit job gets before its time limit; none outside a submitit job."""
    job = _job_environment()
    return () if job is None else (signal.Signals[f"SIG{job.USR_SIG}"],)


def leave_preempted(signum: int, displaced) -> None:
    """After a signal stopped training (checkpoint saved, process group closed). In a submitit job the signal goes
    on to `displaced`, the handler training took it from: submitit's requeues the job from rank 0 and exits;
    then every task exits without a result, so that the sweep waits for the requeued job's (or, after a cancel,
    reports the job as unfinished). Outside a submitit job this returns and the process ends normally."""
    if _job_environment() is None:
        return
    if callable(displaced):
        displaced(signum, None)
    sys.exit(PREEMPTED_EXIT)
