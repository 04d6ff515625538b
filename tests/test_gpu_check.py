"""`ttt-gpu-check` without a GPU: its CPU checks pass, its measurements are skipped, and a broken
implementation fails its check and the command."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tools.gpu.check as gpu_check
from trainer.compose import one_process_job

REPO = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_runs_the_cpu_checks_and_skips_the_measurements(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, even on a machine with a GPU
    command = [sys.executable, "-m", "tools.gpu.check", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert gpu_check.NO_GPU_LINE in run.stdout.splitlines()
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["torch"] == torch.__version__ and report["passed"]
    rows = {row["name"]: row for row in report["results"]}
    checks = [check.name for check in gpu_check.device_checks(torch.device("cpu"))]
    assert list(rows) == [*checks, *gpu_check.MEASUREMENTS]
    triton = importlib.util.find_spec("triton") is not None
    for name in checks:
        expected = "skip" if "Triton" in name and not triton else "pass"
        assert rows[name]["status"] == expected, rows[name]
        if expected == "pass":
            assert 0 <= rows[name]["value"] <= rows[name]["data"]["tolerance"]
    assert all(rows[name]["status"] == "skip" for name in gpu_check.MEASUREMENTS)


def _perturbed(function, factor: float):
    """`function` with its first output scaled: a small, plausible bug."""

    def broken(*args, **kwargs):
        out = function(*args, **kwargs)
        return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor

    return broken


BROKEN = {"attention": ("segment_attention", 0), "window": ("segment_attention", 1), "scan": ("chunk_scan", 3)}


@pytest.mark.parametrize("name, check", BROKEN.values(), ids=BROKEN.keys())
def test_a_perturbed_implementation_fails_its_check(monkeypatch, name, check):
    monkeypatch.setattr(gpu_check, name, _perturbed(getattr(gpu_check, name), 1 + 1e-3))
    result = gpu_check.run_check(gpu_check.device_checks(torch.device("cpu"))[check])
    assert result.status == "fail" and result.value > result.data["tolerance"], result


def test_a_failing_check_fails_the_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "chunk_scan", _perturbed(gpu_check.chunk_scan, 1 + 1e-3))
    monkeypatch.setattr(gpu_check, "interpreted_scan_errors", lambda: {"out": 0.0})  # spare a child process
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path / "report.json")])
    assert exit_info.value.code == 1
    assert "| chunk scan, fp32 vs fp64 |" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["passed"]
    assert [row["name"] for row in report["results"] if row["status"] == "fail"] == ["chunk scan, fp32 vs fp64"]


def test_the_measurements_run_end_to_end_on_cpu_with_a_tiny_model(monkeypatch):
    """The GPU measurements' plumbing (jobs, training steps, planner, rows), on the tiny model at short lengths
    with torch.cuda's memory counters stubbed: a GPU lease is too short to find a crash in them there."""
    counters = {"memory_allocated": 0, "max_memory_allocated": 3 << 20, "get_device_name": "NVIDIA H200"}
    for name, value in counters.items():
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value: value)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *args: type("GPU", (), {"total_memory": 1 << 36}))
    sizes = {"OVERHEAD_MODEL": "tiny", "MFU_MODEL": "tiny", "SEQ_LEN": 128, "LADDER": (64, 128), "LONGEST_TARGET": 128}
    for name, value in sizes.items():
        monkeypatch.setattr(gpu_check, name, value)
    monkeypatch.setattr(gpu_check, "WARMUP_STEPS", 1)
    measured = gpu_check.gpu_measurements(gpu_check.Deadline(float("inf")), None)
    rows = {row.name: row for row in measured}
    assert set(gpu_check.MEASUREMENTS) <= set(rows)
    assert all(row.status in ("pass", "fail", "info") for row in measured), measured
    overhead, baseline, mfu, longest = (rows[name] for name in gpu_check.MEASUREMENTS)
    runs = [row.data for row in measured if row.name.startswith("step time")]
    assert [run["ttt"] for run in runs] == ["ntp", "none", "ntp"] and all(len(run["step_s"]) == 3 for run in runs)
    assert overhead.value == pytest.approx(runs[0]["median_step_s"] / runs[1]["median_step_s"])
    assert baseline.value == pytest.approx(runs[1]["median_step_s"] / baseline.data["plain_s"])
    planner = [row for row in measured if row.name.startswith("planner vs measured peak")]
    assert len(planner) == 3 and all(row.data["planned"] > 0 and row.data["peak"] == 3 << 20 for row in planner)
    saved = rows["saved activations per decoder layer, ntp run"].data
    assert len(saved["measured"]) == len(saved["planned"]) and all(n > 0 for n in saved["measured"])
    assert runs[0]["profile"]["launches"] > 0  # on CPU: the operators the step called
    assert 0 < mfu.value < gpu_check.MFU_TARGET  # a CPU against an H200's peak
    assert (longest.status, longest.value, longest.data["stopped"]) == ("pass", 128, "every length trained")


def test_each_measured_step_gets_the_step_time_models_prediction_beside_it(monkeypatch):
    """The row ttt-gpu-check prints after each measured step: the step-time model's prediction for this GPU, passing
    within 15% and failing beyond."""
    from trainer.planning.step_time import builtin_rates, predict_step

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    job = one_process_job("qwen3-0.6b", "ntp", 32768)
    predicted = predict_step(job, 4, builtin_rates("h200")).step_s
    close = gpu_check._predicted_row("step-time model", job, 4, predicted / 1.1)
    assert close.status == "pass" and abs(close.value - 0.1) < 1e-9 and close.data["predicted_s"] == predicted
    assert gpu_check._predicted_row("step-time model", job, 4, predicted / 1.2).status == "fail"
    assert gpu_check._predicted_row("step-time model", job, None, predicted).data["predicted_s"] != predicted
