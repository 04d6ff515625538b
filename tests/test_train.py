"""The training job end to end on CPU: sweeps, W&B offline history, checkpoints, resume, faults, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import training_numbers

import trainer.checkpoint
import trainer.loop
import trainer.model
import trainer.optim
from trainer.checkpoint import complete_checkpoints, load_checkpoint
from trainer.compose import job_of
from trainer.config import ConfigError
from trainer.integrity import file_sha256
from trainer.loop import NonFiniteLossError, run

FAST = ["experiment=smoke", "parallel=single"]


def cli(*overrides: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "trainer.train", *overrides], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"ttt-train failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wandb_history_file(run_dir: Path) -> Path:
    (found,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return found


def compose_job(*overrides: str):
    return job_of(list(overrides))


def test_two_point_sweep_with_offline_wandb(tmp_path):
    sweep = tmp_path / "sweep-7f3a"
    cli("-m", *FAST, "ttt.lr=0.5,2.0", f"hydra.sweep.dir={sweep}")
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    losses = []
    for run_dir in runs:
        rows = metrics(run_dir)
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
        assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_memory_bytes"} <= rows[0].keys()
        assert any(key.startswith("ttt_update_norm/") for key in rows[0])
        assert (run_dir / "checkpoints" / "step-6" / "meta.json").exists()
        history = wandb_history_file(run_dir).read_bytes()
        for key in (b"tokens_per_s", b"grad_norm", b"sweep-7f3a"):  # logged keys, and the sweep as W&B group
            assert key in history
        losses.append([r["loss"] for r in rows])
    assert losses[0][0] == losses[1][0] and losses[0][-1] != losses[1][-1]  # same data, different fast-weight lr


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    cli(*FAST, f"hydra.run.dir={full}")
    cli(*FAST, f"hydra.run.dir={resumed}", f"checkpoint.resume={full}/checkpoints/step-3")
    assert training_numbers(metrics(resumed)) == training_numbers(metrics(full)[3:])  # bit for bit, times aside


def test_resume_with_another_process_count_and_cp_degree(tmp_path):
    cp2, cp1 = tmp_path / "cp2", tmp_path / "cp1"
    cli("experiment=smoke", "parallel.cp=2", "parallel.nproc_per_node=2", f"hydra.run.dir={cp2}")
    cli(*FAST, f"hydra.run.dir={cp1}", f"checkpoint.resume={cp2}/checkpoints/step-3")
    for want, got in zip(metrics(cp2)[3:], metrics(cp1), strict=True):
        assert got["step"] == want["step"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    job = compose_job(*FAST)
    real_save, calls = trainer.checkpoint.dcp.save, []

    def save_then_crash(state, checkpoint_id, **kwargs):
        calls.append(checkpoint_id)
        if len(calls) == 2:  # the step-6 checkpoint: leave a half-written file behind, then die
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
            raise OSError("disk full")
        return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

    monkeypatch.setattr(trainer.checkpoint.dcp, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        run(job, tmp_path)
    root = tmp_path / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-3"]
    assert (root / ".step-6.partial").exists()
    monkeypatch.setattr(trainer.checkpoint.dcp, "save", real_save)
    resumed = run(compose_job(*FAST, "checkpoint.resume=auto"), tmp_path)
    assert resumed.name == "step-6" and not (root / ".step-6.partial").exists()
    model = trainer.model.build_model(job.model, job.ttt, torch.device("cpu"), seed=123)
    optimizer = trainer.optim.build_optimizer(model, job.optim)
    assert load_checkpoint(root / "step-6", model, optimizer)["step"] == 6


def test_non_finite_steps_are_skipped_then_abort(tmp_path, monkeypatch):
    real_ce, calls = trainer.model.linear_cross_entropy, []

    def nan_after_four(*args, **kwargs):
        calls.append(1)
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if len(calls) > 4 else loss

    monkeypatch.setattr(trainer.model, "linear_cross_entropy", nan_after_four)
    job = compose_job(*FAST, "train.steps=20")
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row.*step-6"):
        run(job, tmp_path)
    rows = metrics(tmp_path)
    assert [r["skipped"] for r in rows] == [False] * 4 + [True] * 3
    # Skipped steps leave the weights untouched, so the step-6 checkpoint is still a good one.
    model = trainer.model.build_model(job.model, job.ttt, torch.device("cpu"), seed=123)
    load_checkpoint(tmp_path / "checkpoints" / "step-6", model, trainer.optim.build_optimizer(model, job.optim))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    env = {**os.environ, "WANDB_SILENT": "true"}
    args = [*FAST, "train.steps=100000", "checkpoint.every=100000", "logging.wandb.mode=disabled"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer.train", *args, f"hydra.run.dir={tmp_path}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (tmp_path / "metrics.jsonl").exists() and len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 2
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    last_step = metrics(tmp_path)[-1]["step"]
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == [f"step-{last_step}"]
    assert "preempted" in stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.steps=0", "train.steps must be an integer >= 1, got 0"),
        ("ttt.method=lora", "ttt.method must be one of none, inplace, ntp, recon, nomem, got 'lora'"),
        ("data.seq_len=100", "data.seq_len must be a multiple of parallel.cp x ttt.chunk_size = 32, got 100"),
        ("parallel.cp=3 data.seq_len=192", "parallel.cp=3 does not divide parallel.nproc_per_node=1"),
        ("optim.lr=-1", "optim.lr must be a positive number, got -1"),
        ("data=synthetic_passkey data.depth=2", "data.depth must be null or a number in [0, 1], got 2"),
        (
            "logging.wandb.mode=sometimes",
            "logging.wandb.mode must be one of online, offline, disabled, got 'sometimes'",
        ),
    ],
)
def test_bad_config_values_fail_with_one_line(tmp_path, override, message):
    result = cli(*FAST, *override.split(), f"hydra.run.dir={tmp_path}", check=False, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]


def test_resuming_on_another_data_stream_is_refused(tmp_path):
    cli(*FAST, f"hydra.run.dir={tmp_path}", "logging.wandb.mode=disabled")
    changed = cli(*FAST, f"hydra.run.dir={tmp_path}", "checkpoint.resume=auto", "train.steps=9", "data.num_pairs=4",
                  "seed=1", check=False, timeout=120)  # fmt: skip
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines() == [
        f"error: checkpoint.resume: {tmp_path}/checkpoints/step-6 read another data stream (data.num_pairs, seed "
        "changed); resuming would not continue it"
    ]
    missing = cli(*FAST, f"hydra.run.dir={tmp_path}", f"checkpoint.resume={tmp_path}/nope", check=False, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: checkpoint.resume={tmp_path}/nope: not a complete checkpoint (no meta.json)"
    ]


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    """Recomputed layers must see the forward's packed-document layout (restored by the TTT context)."""
    # inplace: its conv masks (unlike NTP's doc-end zeros) change gradients if the layout were lost.
    overrides = [*FAST, "ttt=inplace", "ttt.chunk_size=32", "data.docs_per_sequence=3", "data.num_pairs=4",
                 "train.steps=3", "logging.wandb.mode=disabled"]  # fmt: skip
    run(compose_job(*overrides), tmp_path / "plain")
    run(compose_job(*overrides, "train.activation_checkpointing=true"), tmp_path / "recompute")
    run(compose_job(*overrides, "train.activation_checkpointing=true", "train.checkpoint_every_n_layers=2"),
        tmp_path / "selective")  # fmt: skip
    plain = metrics(tmp_path / "plain")
    for variant in ("recompute", "selective"):
        assert [r["loss"] for r in metrics(tmp_path / variant)] == [r["loss"] for r in plain]
        assert [r["grad_norm"] for r in metrics(tmp_path / variant)] == [r["grad_norm"] for r in plain]


def test_wandb_online_without_credentials_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run(compose_job(*FAST, "train.steps=2", "logging.wandb.mode=online"), tmp_path)
    assert "logging offline" in capsys.readouterr().err
    assert b"grad_norm" in wandb_history_file(tmp_path).read_bytes()


@pytest.mark.parametrize(
    "overrides,accum",
    [  # dp=2 consumes two sequences a step: the one-process reference accumulates two micro-batches
        (["parallel.engine=fsdp2", "parallel.cp=1"], 2),
        (["parallel.engine=ddp", "parallel.cp=2"], 1),
        (["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.cp=2"], 1),
        (["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.cp=1"], 2),
    ],
    ids=["fsdp2-dp2", "ddp-cp2", "zero2-cp2", "zero3-dp2"],
)
def test_engines_on_two_processes_match_one_process(tmp_path, overrides, accum):
    two, one = tmp_path / "two", tmp_path / "one"
    quiet = "logging.wandb.mode=disabled"
    cli("experiment=smoke", *overrides, quiet, f"hydra.run.dir={two}")
    cli(*FAST, f"train.grad_accum={accum}", quiet, f"hydra.run.dir={one}")
    for got, want in zip(metrics(two), metrics(one), strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)


def test_deepspeed_checkpoints_resume_through_the_same_logic(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    engine = ["experiment=smoke", "parallel.engine=deepspeed", "logging.wandb.mode=disabled"]
    cli(*engine, f"hydra.run.dir={full}")
    assert (full / "checkpoints" / "step-3" / "deepspeed").is_dir()
    cli(*engine, f"hydra.run.dir={resumed}", f"checkpoint.resume={full}/checkpoints/step-3")
    for want, got in zip(metrics(full)[3:], metrics(resumed), strict=True):
        assert got["step"] == want["step"] and got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    wrong = cli(*FAST, f"hydra.run.dir={tmp_path / 'x'}", f"checkpoint.resume={full}/checkpoints/step-3", check=False)
    assert "is a deepspeed checkpoint; this job's engine reads dcp" in wrong.stderr


class _RunsCode:
    """What a malicious pickle looks like: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_deepspeed_files_are_never_unpickled(tmp_path):
    """A DeepSpeed file rewritten to run code (its meta.json record updated to match) stops the start."""
    run_dir, marker = tmp_path / "run", tmp_path / "code-ran"
    engine = ["experiment=smoke", "parallel.engine=deepspeed", "logging.wandb.mode=disabled", "train.steps=1"]
    cli(*engine, f"hydra.run.dir={run_dir}")
    checkpoint = run_dir / "checkpoints" / "step-1"
    optim = next((checkpoint / "deepspeed").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": _RunsCode(f"touch {marker}")}, optim)
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"][f"deepspeed/{optim.name}"] = {"size": optim.stat().st_size, "sha256": file_sha256(optim)}
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    resumed = cli(*engine, f"hydra.run.dir={run_dir}", "checkpoint.resume=auto", "train.steps=2", check=False)
    assert resumed.returncode == 2 and not marker.exists()
    assert resumed.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint.resume: {optim}: holds objects a checkpoint should not (posix.system); not loading it"
    )


@pytest.mark.parametrize("trainable", ["ttt", "ttt+norms"])
def test_a_frozen_base_stays_bit_identical_and_only_the_ttt_parameters_move(trainable):
    """train.trainable: optimizer steps change exactly the parameters that train, the base's weights keep
    every bit, and the backward never reaches the embeddings (nothing below the lowest TTT layer trains)."""
    from trainer.data import SequenceLoader, build_dataset
    from trainer.loop import build_training, setup_ranks, train_step

    job = compose_job(*FAST, f"train.trainable={trainable}", "ttt.layers=[1]")
    ranks = setup_ranks(1)
    training = build_training(job, ranks)
    before = {name: p.detach().clone() for name, p in training.model.named_parameters()}
    trains = {name for name, p in training.model.named_parameters() if p.requires_grad}
    assert trains and all(".ttt_" in name or (trainable == "ttt+norms" and "norm" in name) for name in trains)
    assert any("norm" in name for name in trains) == (trainable == "ttt+norms")
    dataset = build_dataset(job.data.name, job.data.seq_len, training.model.config.vocab_size, 0, job.data.options)
    embeddings = training.model.get_input_embeddings()
    reached = []
    embeddings.register_full_backward_hook(lambda *args: reached.append(True))
    loader = SequenceLoader(dataset, 1, 0, 1)
    for _ in range(2):  # the first step moves ttt_proj off zero, the second the gate (V = 0 hides it before)
        train_step(training.step_model, training.optimizer, loader, job, ranks)
    for name, param in training.model.named_parameters():
        unchanged = torch.equal(param.detach(), before[name])
        assert unchanged == (name not in trains), name
    assert not reached


def test_trainable_ttt_needs_ttt_parameters():
    with pytest.raises(ConfigError, match="train.trainable"):
        compose_job(*FAST, "ttt=none", "train.trainable=ttt")
