"""`checkpoint.async_save`: checkpoints written in the background keep every promise of the synchronous ones: a
checkpoint only with its meta.json, once every file is written; a crash during the background write leaves the
previous checkpoint as the resume point; resuming from an async checkpoint is bit for bit the uninterrupted run."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
from conftest import training_numbers

import trainer.checkpoint
import trainer.loop
from tests.test_train import cli, metrics
from trainer.checkpoint import checkpoint_problem, complete_checkpoints, resolve_resume
from trainer.compose import job_of
from trainer.config import ConfigError
from trainer.loop import run

ASYNC = ["experiment=smoke", "logging.wandb.mode=disabled", "checkpoint.async_save=true"]


def test_resuming_an_async_checkpoint_under_cp2_is_the_uninterrupted_run(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    cp2 = [*ASYNC, "parallel.cp=2", "parallel.nproc_per_node=2"]
    cli(*cp2, f"hydra.run.dir={full}")
    saved = complete_checkpoints(full / "checkpoints")
    assert [p.name for p in saved] == ["step-3", "step-6"] and all(checkpoint_problem(p) is None for p in saved)
    assert not list((full / "checkpoints").glob(".step-*.partial"))
    cli(*cp2, f"hydra.run.dir={resumed}", f"checkpoint.resume={full}/checkpoints/step-3")
    assert training_numbers(metrics(resumed)) == training_numbers(metrics(full)[3:])


def test_a_crash_during_the_background_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """The step-4 save's background write never ends (a writer stuck on a dying disk); step 5 then crashes. Only
    step 2 is a checkpoint, resume=auto takes it, and the resumed run trains the same numbers as one never stopped."""
    overrides = [*ASYNC, "parallel=single", "checkpoint.every=2"]
    run(job_of(overrides), tmp_path / "uninterrupted")
    real_async_save, stuck = trainer.checkpoint.dcp.async_save, threading.Event()

    def async_save(state, **kwargs):
        written = real_async_save(state, **kwargs)
        if "step-4" not in str(kwargs["checkpoint_id"]):
            return written
        held = Future()  # the write is still going when the job dies

        def release_when_allowed():
            stuck.wait()
            held.set_result(written.result())

        threading.Thread(target=release_when_allowed, daemon=True).start()
        return held

    real_step = trainer.loop.train_step

    def step(step_model, optimizer, loader, job, ranks, clock=None):
        if loader.consumed == 4 * job.data.batch_size:
            raise RuntimeError("node lost")
        return real_step(step_model, optimizer, loader, job, ranks, clock)

    monkeypatch.setattr(trainer.checkpoint.dcp, "async_save", async_save)
    monkeypatch.setattr(trainer.loop, "train_step", step)
    with pytest.raises(RuntimeError, match="node lost"):
        run(job_of(overrides), tmp_path / "crashed")
    root = tmp_path / "crashed" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-2"]
    assert (root / ".step-4.partial").is_dir() and not (root / ".step-4.partial" / "meta.json").exists()
    assert resolve_resume(root, "auto") == root / "step-2"
    monkeypatch.undo()
    stuck.set()  # the dead run's writer thread may go on now: nothing ever finishes its save
    run(job_of([*overrides, "checkpoint.resume=auto"]), tmp_path / "crashed")
    assert training_numbers(metrics(tmp_path / "crashed")) == training_numbers(metrics(tmp_path / "uninterrupted"))
    assert [p.name for p in complete_checkpoints(root)] == ["step-4", "step-6"]  # checkpoint.keep=2


def test_an_async_save_finishes_while_training_goes_on(tmp_path, monkeypatch):
    """Each async save is finished once, at the step that started it or a later one (the end's at the end)."""
    finished_at = []
    real_finish = trainer.checkpoint._finish
    steps = []
    real_step = trainer.loop.train_step

    def step(step_model, optimizer, loader, job, ranks, clock=None):
        steps.append(loader.consumed // job.data.batch_size + 1)
        return real_step(step_model, optimizer, loader, job, ranks, clock)

    def finish(root, step_number, *args):
        finished_at.append((step_number, steps[-1]))
        return real_finish(root, step_number, *args)

    monkeypatch.setattr(trainer.checkpoint, "_finish", finish)
    monkeypatch.setattr(trainer.loop, "train_step", step)
    run(job_of([*ASYNC, "parallel=single", "checkpoint.every=2", "train.steps=5"]), tmp_path)
    assert [saved for saved, _ in finished_at] == [2, 4, 5]
    assert all(during >= saved for saved, during in finished_at)


def test_deepspeed_writes_its_own_checkpoints():
    with pytest.raises(ConfigError, match="checkpoint.async_save must be false with parallel.engine=deepspeed"):
        job_of([*ASYNC, "parallel.engine=deepspeed"])
