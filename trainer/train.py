"""`ttt-train` (== `python -m trainer.train`): the Hydra app that configures and launches a training job.

- Under torchrun every rank composes the same config; rank 0's run directory is used by all. So do the
  tasks of a job that submitit started (`hydra/launcher=slurm` or `local_jobs`): each is one rank of the
  job's process group (trainer/cluster.py).
- Otherwise, with `parallel.nproc_per_node > 1`, the job starts its own local workers through
  torch's elastic launcher, so a multirun sweep of context-parallel jobs works from one command.
- The app returns the job's `objective` (the last loss or eval/accuracy, read back from metrics.jsonl
  on rank 0), which a sweeper such as Optuna's minimises or maximises. A job that runs a trial of a search
  (`hydra/sweeper=optuna`) also reports to and records its trial in the study (trainer/search.py).
- Bad configuration values and bad inputs (trainer/preflight.py) end the program with one line on
  stderr and exit code 2, before any worker starts. Under torchrun the process group is started
  first, so that the ranks share the start-up hashing; rank 0 alone prints.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from trainer.cluster import default_resume, join_job_ranks, leave_preempted, preemption_signals
from trainer.compose import CONF_DIR
from trainer.config import OBJECTIVES, ConfigError, JobConfig, job_config
from trainer.faults import PreemptionFlag
from trainer.search import check_direction, finish_trial, trial_spec
from trainer.tracking import last_recorded

# Configs that need a package of the `cluster` extra (module, what to call it); without it Hydra fails while
# composing them, with a page of config search paths, or the search fails once started.
_PLUGIN_CONFIGS = {
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "the hydra-submitit-launcher plugin"),
    "hydra/launcher=local_jobs": ("hydra_plugins.hydra_submitit_launcher", "the hydra-submitit-launcher plugin"),
    "hydra/sweeper=optuna": ("optuna", "optuna"),
    "experiment=search": ("optuna", "optuna"),
}


def _ranks_started_for_us() -> bool:
    """This process is one rank of a job whose processes were started for it: by torchrun, or as the tasks of
    a submitit job (`join_job_ranks` exported their ranks)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _multi_process() -> bool:
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def _start_ranks(job, run_dir: str) -> str:
    """Join the job's process group; returns rank 0's run directory, which every rank writes under."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():  # modulo: a Slurm task bound to its own GPU sees that one only
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=timedelta(minutes=job.parallel.timeout_minutes))
    if dist.get_world_size() % job.parallel.cp:
        raise ConfigError(f"parallel.cp={job.parallel.cp} does not divide the world size {dist.get_world_size()}")
    shared = [run_dir]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def worker(job: JobConfig, run_dir: str, wandb_group: str | None) -> None:
    """One training process (rank); also the entry point of self-launched workers, which receive the validated
    job as it is (pickled by the launcher)."""
    from trainer.loop import run  # after the process group exists in spawned workers
    from trainer.telemetry import StepOutOfMemory

    if _multi_process() and not dist.is_initialized():  # a self-launched worker
        run_dir = _start_ranks(job, run_dir)
    preemption = PreemptionFlag(preemption_signals())
    try:
        run(job, Path(run_dir), wandb_group, preemption)
        if dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while a peer still talks to it
    except StepOutOfMemory as err:  # the rank that ran out says so in one line; torchrun stops the others
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if preemption.received is not None:
        leave_preempted(preemption.received, preemption.displaced[preemption.received])


def _launch_local(job: JobConfig, run_dir: str, wandb_group: str | None, nproc: int) -> None:
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn",
    )  # fmt: skip
    elastic_launch(config, worker)(job, run_dir, wandb_group)


def _say(line: str) -> None:
    """One line on stderr, from rank 0 only (every rank of a torchrun job runs the start-up checks)."""
    if _rank() == 0:
        print(line, file=sys.stderr)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from trainer.preflight import check_inputs  # imports transformers: after Hydra parsed the command line

    join_job_ranks()  # a task of a submitit job is one rank, as a torchrun worker is
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    try:
        job = job_config(cfg)
        job = replace(job, checkpoint=replace(job.checkpoint, resume=default_resume(job.checkpoint.resume)))
        check_direction(hydra_cfg.sweeper.get("direction"), job.objective)
        if not _ranks_started_for_us() and job.parallel.nproc_per_node % job.parallel.cp:
            raise ConfigError(
                f"parallel.cp={job.parallel.cp} does not divide parallel.nproc_per_node={job.parallel.nproc_per_node}"
            )
        if _ranks_started_for_us() and _multi_process():
            run_dir = _start_ranks(job, run_dir)
        resume = check_inputs(job, Path(run_dir), _say)
    except ConfigError as err:
        _say(f"error: {err}")
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)
    # the checkpoint verified at start-up (not "auto"), and the trial of a search this job runs, if any
    job = replace(job, checkpoint=replace(job.checkpoint, resume=None if resume is None else str(resume)))
    job = replace(job, search=trial_spec(hydra_cfg.sweeper))
    sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    wandb_group = job.wandb.group or sweep
    if _ranks_started_for_us() or job.parallel.nproc_per_node == 1:
        worker(job, run_dir, wandb_group)
    else:
        try:
            _launch_local(job, run_dir, wandb_group, job.parallel.nproc_per_node)
        except ChildFailedError as err:
            first = next(iter(err.failures.values()))
            print(f"error: a worker failed (exit code {first.exitcode}); see its output above", file=sys.stderr)
            sys.exit(1)
    if _rank() != 0:
        return None
    objective = last_recorded(Path(run_dir) / "metrics.jsonl", OBJECTIVES[job.objective])
    finish_trial(job.search, objective)
    return objective


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # not even the hydra_plugins namespace
        return False


def cli() -> None:
    """`ttt-train`: the Hydra app, after checking that the plugins the command line's configs need are there."""
    for arg in sys.argv[1:]:
        module, name = _PLUGIN_CONFIGS.get(arg, (None, None))
        if module is not None and not _installed(module):
            print(f'error: {arg} needs {name}: pip install -e ".[cluster]"', file=sys.stderr)
            sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
