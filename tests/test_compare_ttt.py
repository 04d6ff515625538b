"""`tools.studies.compare_ttt` trains methods side by side and, with --ppl-data, scores each run's held-out NLL by
position within and beyond attention's window; with --distance-edges it scores each run's held-out answers again
in other distance buckets."""

from __future__ import annotations

import json

import pytest

from tools.studies.compare_ttt import main
from trainer.data import build_dataset


def test_two_methods_with_held_out_nll_by_position(tmp_path, capsys):
    out = tmp_path / "compare"
    main(["--methods", "none,ntp", "--out", str(out), "--ppl-data", "synthetic_recall", "--ppl-length", "64",
          "--ppl-documents", "2", "--ppl-window", "16", "--",
          "experiment=smoke", "parallel=single", "train.steps=2", "logging.wandb.mode=disabled"])  # fmt: skip
    report = json.loads((out / "compare.json").read_text())
    for method in ("none", "ntp"):
        nll = report["runs"][method][0]["held_out_nll"]
        assert [b["end"] for b in nll["buckets"]] == [16, 32, 48, 64]
        beyond = nll["buckets"][1:]
        mean = sum(b["nll"] * b["tokens"] for b in beyond) / sum(b["tokens"] for b in beyond)
        assert nll["within"] == nll["buckets"][0]["nll"] and abs(nll["beyond"] - mean) < 1e-12
    table = capsys.readouterr().out
    assert "held-out NLL within the window | beyond it |" in table.splitlines()[0]
    assert (out / "held_out_nll.png").stat().st_size > 0


def test_answers_rescored_by_distance_match_the_training_loops_score(tmp_path, capsys):
    out = tmp_path / "compare"
    job = ["experiment=smoke", "parallel=single", "train.steps=2", "eval.samples=4", "data.query_gap=0",
           "data.query_gap_max=64", "logging.wandb.mode=disabled"]  # fmt: skip
    main(["--methods", "ntp", "--out", str(out), "--distance-edges", "25,35", "--", *job])
    run = json.loads((out / "compare.json").read_text())["runs"]["ntp"][0]
    buckets = run["by_distance"]
    held_out = build_dataset(
        "synthetic_recall",
        128,
        256,
        seed=271828,
        options={"num_pairs": 8, "query_gap": 0, "query_gap_max": 64, "docs_per_sequence": 1, "loss_on": "all"},
    )
    distances = [a.distance for i in range(4) for a in held_out.sample(i).answers]
    expected = [sum(lo <= d < hi for d in distances) for lo, hi in ((0, 25), (25, 35), (35, 10**9))]
    assert [(b["min"], b["max"]) for b in buckets] == [(0, 25), (25, 35), (35, None)]
    assert [b["answers"] for b in buckets] == expected and min(expected[1:]) > 0  # the buckets split real answers
    loop = json.loads((out / "ntp-seed0" / "eval.json").read_text())  # the loop's score after the last step
    hits = sum(b["accuracy"] * b["answers"] for b in buckets if b["answers"])
    assert abs(hits / loop["answers"] - loop["accuracy"]) < 1e-12  # the same checkpoint, scored the same way
    header, rule, row = capsys.readouterr().out.splitlines()[:3]
    assert header.count("|") == rule.count("|") == row.count("|")
    spans = ["[0, 25)", "[25, 35)", ">= 35"]
    assert header.endswith(" |".join(f" accuracy at distance {s} ({n})" for s, n in zip(spans, expected)) + " |")
    with pytest.raises(SystemExit) as stop:
        main(["--methods", "ntp", "--out", str(out), "--distance-edges", "60,20", "--", *job])
    assert stop.value.code == 2 and "increasing positive integers" in capsys.readouterr().err
