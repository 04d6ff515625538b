"""`ttt-train` (== `python -m trainer.train`): the Hydra app that configures and launches a training job.

- Under torchrun every rank composes the same config; rank 0's run directory is used by all.
- Outside torchrun with `parallel.nproc_per_node > 1` the job starts its own local workers through
  torch's elastic launcher, so a multirun sweep of context-parallel jobs works from one command.
- Bad configuration values end the program with one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from trainer.config import ConfigError, job_config


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def worker(tree: dict, run_dir: str, wandb_group: str | None) -> None:
    """One training process (rank); also the entry point of self-launched workers."""
    from trainer.loop import run  # after the process group exists in spawned workers

    job = job_config(tree)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        if dist.get_world_size() % job.parallel.cp:
            raise ConfigError(f"parallel.cp={job.parallel.cp} does not divide the world size {dist.get_world_size()}")
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)  # every rank writes under rank 0's run directory
        run_dir = shared[0]
    try:
        run(job, Path(run_dir), wandb_group)
        if dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _launch_local(tree: dict, run_dir: str, wandb_group: str | None, nproc: int) -> None:
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn",
    )  # fmt: skip
    elastic_launch(config, worker)(tree, run_dir, wandb_group)


def _check_data(job) -> None:
    """Open the dataset once before any worker starts, so a bad data setting or input is one line."""
    from transformers import AutoConfig

    from trainer.data import build_dataset

    if job.model.path is not None:
        vocab_size = AutoConfig.from_pretrained(job.model.path).vocab_size
    else:
        vocab_size = AutoConfig.for_model(job.model.family, **job.model.config).vocab_size
    try:
        dataset = build_dataset(job.data.name, job.data.seq_len, vocab_size, job.seed, job.data.options)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if job.eval.every and not hasattr(dataset, "sample"):
        raise ConfigError(f"eval.every needs a generated task with answers (data=synthetic_*), not {job.data.name}")


def _check_resume(job, run_dir: Path) -> None:
    """A checkpoint to resume from exists, and it was trained on the data stream this job reads."""
    from trainer.checkpoint import resolve_resume
    from trainer.data import stream_identity

    try:
        checkpoint = resolve_resume(run_dir / "checkpoints", job.checkpoint.resume)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    if checkpoint is None:
        return
    saved = json.loads((checkpoint / "meta.json").read_text()).get("data_stream")
    current = json.loads(json.dumps(stream_identity(job.data.name, job.data.seq_len, job.seed, job.data.options)))
    if saved is not None and saved != current:
        changed = sorted(k for k in {**saved, **current} if saved.get(k) != current.get(k))
        raise ConfigError(
            f"checkpoint.resume: {checkpoint} read another data stream ({', '.join(changed)} changed); "
            "resuming would not continue it"
        )


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    try:
        job = job_config(cfg)
        if not _under_torchrun() and job.parallel.nproc_per_node % job.parallel.cp:
            raise ConfigError(
                f"parallel.cp={job.parallel.cp} does not divide parallel.nproc_per_node={job.parallel.nproc_per_node}"
            )
        _check_data(job)
        _check_resume(job, Path(hydra_cfg.runtime.output_dir))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    tree = OmegaConf.to_container(cfg, resolve=True)
    run_dir = hydra_cfg.runtime.output_dir
    sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    wandb_group = job.wandb.group or sweep
    if _under_torchrun() or job.parallel.nproc_per_node == 1:
        worker(tree, run_dir, wandb_group)
        return
    try:
        _launch_local(tree, run_dir, wandb_group, job.parallel.nproc_per_node)
    except ChildFailedError as err:
        first = next(iter(err.failures.values()))
        print(f"error: a worker failed (exit code {first.exitcode}); see its output above", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
