"""Checkpoints a job can trust: a damaged newest checkpoint is skipped under checkpoint.resume=auto, a
worker killed while saving loses nothing but the unfinished save, and the ranks verify in parallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from conftest import training_numbers

from tests.multiproc import run_ranks
from tests.test_train import FAST, cli, metrics
from trainer.checkpoint import checkpoint_problem, complete_checkpoints, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUIET = [*FAST, "logging.wandb.mode=disabled"]


def same_numbers(rows: list[dict], reference: list[dict]) -> bool:
    """Equal, bit for bit, in everything but the timing and memory columns."""
    return training_numbers(rows) == training_numbers(reference)


def test_auto_resume_skips_a_damaged_checkpoint_and_reproduces_the_run(tmp_path):
    cli(*QUIET, f"hydra.run.dir={tmp_path}")
    uninterrupted = metrics(tmp_path)
    shard = tmp_path / "checkpoints" / "step-6" / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    resumed = cli(*QUIET, f"hydra.run.dir={tmp_path}", "checkpoint.resume=auto")
    notes = [line for line in resumed.stderr.splitlines() if line.startswith("checkpoint.resume=auto")]
    assert notes == [
        f"checkpoint.resume=auto: step-6 is damaged ({shard}: truncated or overwritten checkpoint ({size // 2} bytes, "
        f"meta.json: {size})); resuming from step-3"
    ]
    assert f"resumed from {tmp_path}/checkpoints/step-3 at step 3" in resumed.stderr
    assert same_numbers(metrics(tmp_path), uninterrupted)  # steps 4-6 redone, bit for bit
    assert checkpoint_problem(tmp_path / "checkpoints" / "step-6") is None  # written again, whole


_KILLED_MID_SAVE = """
import os, signal, sys
import trainer.checkpoint
from trainer.train import main

real_save = trainer.checkpoint.dcp.save

def save_then_die(state, checkpoint_id, **kwargs):
    real_save(state, checkpoint_id=checkpoint_id, **kwargs)
    # the tensors are on disk, meta.json is not: a save cut short (under torchrun, on the last rank only)
    if "step-6" in str(checkpoint_id) and os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", "0"):
        os.kill(os.getpid(), signal.SIGKILL)

trainer.checkpoint.dcp.save = save_then_die
sys.argv = ["ttt-train", *sys.argv[1:]]
main()
"""


def test_worker_killed_while_saving_then_auto_resume_finishes_the_same_run(tmp_path):
    args = [*QUIET, f"hydra.run.dir={tmp_path}"]
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, *args], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-3"] and (root / ".step-6.partial").is_dir()
    before_crash = metrics(tmp_path)  # step 6's record waits for its save (it carries the save's time)
    assert [r["step"] for r in before_crash] == [1, 2, 3, 4, 5]
    cli(*args, "checkpoint.resume=auto")
    resumed = metrics(tmp_path)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6] and same_numbers(resumed[:5], before_crash)
    assert [p.name for p in complete_checkpoints(root)] == ["step-3", "step-6"] and not (
        root / ".step-6.partial"
    ).exists()
    assert checkpoint_problem(root / "step-6") is None


def test_one_of_two_workers_killed_while_saving_then_auto_resume_finishes_the_same_run(tmp_path):
    """CP=2 under torchrun: rank 1 dies in the middle of the step-6 save, torchrun stops rank 0; a
    self-launched CP=2 job with resume=auto redoes steps 4-6 with the same losses, bit for bit."""
    script = tmp_path / "killed_mid_save.py"
    script.write_text(_KILLED_MID_SAVE)
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", "logging.wandb.mode=disabled", f"hydra.run.dir={run_dir}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    killed = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KILL_RANK": "1"}, cwd=REPO)  # fmt: skip
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-2000:]
    root = run_dir / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-3"] and (root / ".step-6.partial").is_dir()
    before_crash = metrics(run_dir)
    assert [r["step"] for r in before_crash] == [1, 2, 3, 4, 5]
    resumed = cli(*args, "checkpoint.resume=auto")
    assert f"resumed from {root}/step-3 at step 3" in resumed.stderr
    after = metrics(run_dir)
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6] and same_numbers(after[:5], before_crash)
    assert [p.name for p in complete_checkpoints(root)] == ["step-3", "step-6"]
    assert checkpoint_problem(root / "step-6") is None


def _save_and_verify(rank: int, world: int, root: Path) -> None:
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    path = save_checkpoint(root, 1, model, optimizer, {"data": {}}, keep=1)
    assert checkpoint_problem(path) is None
    files = json.loads((path / "meta.json").read_text())["files"]
    assert sorted(files) == [".metadata", "__0_0.distcp", "__1_0.distcp", "rng-rank0.json", "rng-rank1.json"]
    torch.distributed.barrier()
    if rank == 0:
        damaged = path / sorted(files)[1]  # __0_0.distcp: the second name, hashed by rank 1
        data = bytearray(damaged.read_bytes())
        data[-1] ^= 1
        damaged.write_bytes(bytes(data))
    torch.distributed.barrier()
    assert checkpoint_problem(path) == f"{path}/__0_0.distcp: corrupted checkpoint (sha256 differs from the meta.json)"


def test_ranks_verify_a_slice_each_and_share_the_verdict(tmp_path):
    run_ranks(_save_and_verify, 2, tmp_path, tmp_path / "checkpoints")
