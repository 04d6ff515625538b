"""Operating a long run: the per-step figures of metrics.jsonl, profiling on request, an out-of-memory step in one
line, the collective timeout and the launch scripts' flight recorder."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import trainer.loop
import trainer.train
from trainer.checkpoint import checkpoint_problem, complete_checkpoints
from trainer.compose import job_of
from trainer.config import ConfigError
from trainer.loop import run
from trainer.planning.memory import model_facts, setup_of
from trainer.planning.step_time import model_flops_per_gpu
from trainer.telemetry import Throughput

REPO = Path(__file__).resolve().parents[1]
FAST = ["experiment=smoke", "parallel=single", "logging.wandb.mode=disabled"]
PER_STEP = {"step_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "time/data_s", "time/forward_backward_s",
            "time/optimizer_s", "time/checkpoint_s", "time/eval_s"}  # fmt: skip


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_step_records_its_time_split_throughput_and_flops(tmp_path):
    job = job_of([*FAST, "train.profile.steps=[2,3]"])
    run(job, tmp_path)
    rows = _rows(tmp_path)
    assert all(PER_STEP <= row.keys() for row in rows)
    assert not any("mfu" in row or any(k.startswith("cuda/") for k in row) for row in rows)  # CPU: no peak, no CUDA
    flops = model_flops_per_gpu(model_facts(trainer.loop.build_meta_model(job.model, job.ttt)), setup_of(job, 1, "cpu"))
    for row in rows:
        train_s = sum(row[f"time/{phase}_s"] for phase in ("data", "forward_backward", "optimizer"))
        phases = train_s + row["time/checkpoint_s"] + row["time/eval_s"]
        assert 0 < phases <= row["step_s"] * 1.01
        assert row["tflops_per_gpu"] * 1e12 == pytest.approx(flops / (job.data.seq_len / row["tokens_per_s_per_gpu"]))
    saving = [row["time/checkpoint_s"] for row in rows]
    assert min(saving[2], saving[5]) > 10 * max(saving[:2] + saving[3:5])  # checkpoint.every=3
    assert rows[-1]["time/eval_s"] > 0 and rows[0]["time/eval_s"] == 0  # the generated task scores at the end
    trace = Path(rows[2]["profile/trace"])  # the profiled steps 2-3 end at step 3
    assert trace.parent == tmp_path / "profile" and json.loads(trace.read_text())["traceEvents"]
    assert not any("profile/trace" in row for row in rows[:2] + rows[3:])


def test_mfu_is_the_achieved_flops_over_the_gpus_peak():
    job = job_of(FAST)
    figures = Throughput(job, model_facts(trainer.loop.build_meta_model(job.model, job.ttt)), 1, torch.device("cpu"))
    figures.peak = 1e12  # what a GPU of the table would set
    record = figures.record(tokens_per_step=128, train_s=0.5)
    assert record["mfu"] == pytest.approx(figures.flops / 0.5 / 1e12)
    assert record["tflops_per_gpu"] == pytest.approx(record["mfu"])  # a 1-TFLOP/s peak


@pytest.mark.parametrize("steps", ["[0,2]", "[3,2]", "[2,7]", "[2]", "'x'"])
def test_bad_profile_steps_are_one_line(steps):
    with pytest.raises(ConfigError, match=r"^train.profile.steps must be \[\] or \[a, b\] with 1 <= a <= b"):
        job_of([*FAST, f"train.profile.steps={steps}"])


def test_out_of_memory_ends_the_job_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """A CUDA OOM in step 5, simulated on CPU: one line naming the step, the sequence length, the planner's estimate
    and what to change; exit code 1; step-3's checkpoint intact, nothing saved after it."""
    real_step = trainer.loop.train_step

    def step_that_runs_out(step_model, optimizer, loader, job, ranks, clock=None):
        if loader.consumed == 4 * job.data.batch_size:  # the fifth step
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_step(step_model, optimizer, loader, job, ranks, clock)

    monkeypatch.setattr(trainer.loop, "train_step", step_that_runs_out)
    with pytest.raises(SystemExit) as stop:
        trainer.train.worker(job_of(FAST), str(tmp_path), None)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 1 and len(err) == 1, err
    for words in ("optimizer step 5", "data.seq_len=128", "the memory planner expected", "GiB per GPU",
                  "train.activation_checkpointing=true", "parallel.cp=2"):  # fmt: skip
        assert words in err[0], err[0]
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-3"]
    assert checkpoint_problem(tmp_path / "checkpoints" / "step-3") is None
    assert len(_rows(tmp_path)) == 4


def test_the_process_group_gets_the_collective_timeout(monkeypatch):
    seen = {}
    monkeypatch.setattr(trainer.train.dist, "init_process_group", lambda backend, timeout: seen.update(t=timeout))
    monkeypatch.setattr(trainer.train.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(trainer.train.dist, "broadcast_object_list", lambda objects, src: None)
    trainer.train._start_ranks(job_of([*FAST, "parallel.timeout_minutes=7.5"]), "runs/x")
    assert seen["t"] == timedelta(minutes=7.5)
    with pytest.raises(ConfigError, match="parallel.timeout_minutes must be a positive number"):
        job_of([*FAST, "parallel.timeout_minutes=0"])


def test_launch_scripts_arm_the_flight_recorder():
    shared = (REPO / "launch" / "collectives.sh").read_text()
    for variable in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_FR_DUMP_TEMP_FILE",
                     "TORCH_NCCL_ASYNC_ERROR_HANDLING"):  # fmt: skip
        assert f"export {variable}=${{{variable}:-" in shared  # set unless the environment already does
    for script in ("single_node.sh", "multi_node.sh"):
        assert 'source "$(dirname "$0")/collectives.sh"' in (REPO / "launch" / script).read_text()
