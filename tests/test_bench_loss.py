"""`python -m tools.bench.loss` without a GPU: one line and exit code 0; bad arguments: one error line and exit
code 2; its measurements, table and JSON run end to end on CPU at small sizes (the GPU budget is kept for the
numbers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tools.bench.loss as bench_loss

REPO = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "bench_loss.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, even on a machine with a GPU
    command = [sys.executable, "-m", "tools.bench.loss", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert (run.returncode, run.stdout) == (0, bench_loss.NO_GPU_LINE + "\n"), run.stderr[-3000:]
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "0"], "argument --tokens: expected a positive integer, got '0'"),
        (["--vocab", "many"], "argument --vocab: expected a positive integer, got 'many'"),
        (["--repeats", "-1"], "argument --repeats: expected a positive integer, got '-1'"),
        (["--candidates", "liger"], "unrecognized arguments: --candidates liger"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_loss.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == f"python -m tools.bench.loss: error: {message}\n", err


def test_measurements_table_and_json_on_cpu():
    """The torch path measured, a missing package reported in its row, the others unaffected."""

    def missing_package():
        raise ModuleNotFoundError("No module named 'fast_loss'")

    candidates = {"torch chunked": bench_loss._torch_chunked, "missing": missing_package}
    shape, accuracy_shape = bench_loss.Shape(300, 16, 500), bench_loss.Shape(37, 16, 501)
    rows = bench_loss.measure_all(candidates, shape, accuracy_shape, repeats=2, device=torch.device("cpu"))

    measured, failed = rows
    assert measured.error is None and 0 < measured.forward_ms < measured.total_ms
    assert measured.loss_error < 1e-6  # fp32 math on the bf16 inputs
    assert 0 < measured.grad_hidden_error < 1e-2 and 0 < measured.grad_head_error < 1e-2  # returned in bf16
    assert failed.error == "ModuleNotFoundError: No module named 'fast_loss'" and failed.total_ms is None

    table = bench_loss.markdown_table(rows).splitlines()
    assert len(table) == 4 and table[0].startswith("| candidate | fwd ms | bwd ms | fwd+bwd ms | bwd/fwd |")
    assert table[3].endswith("| ModuleNotFoundError: No module named 'fast_loss' |")
    report = json.loads(json.dumps(bench_loss.report_json(rows, shape, accuracy_shape, 2, "cpu")))
    assert report["versions"]["torch"] == torch.__version__ and report["shape"]["vocab"] == 500
    assert [row["candidate"] for row in report["rows"]] == ["torch chunked", "missing"]
