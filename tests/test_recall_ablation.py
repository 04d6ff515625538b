"""experiment=recall_ablation: the sweep reports per method, and CP=2 reproduces CP=1."""

from __future__ import annotations

import json
import math

from test_train import cli, metrics, wandb_history_file

from tools.studies.recall_ablation import collect, markdown, summarize

SHORT = ["train.steps=4", "eval.every=4", "eval.samples=4"]


def test_a_short_sweep_writes_the_report_and_logs_it(tmp_path):
    sweep = tmp_path / "sweep"
    cli("-m", "experiment=recall_ablation", "ttt.method=none,ntp", "seed=0,1", *SHORT, f"hydra.sweep.dir={sweep}")
    runs = collect(sweep)
    assert sorted((r["method"], r["seed"]) for r in runs) == [("none", 0), ("none", 1), ("ntp", 0), ("ntp", 1)]
    summary = json.loads((sweep / "ablation.json").read_text())["summary"]
    assert list(summary) == ["none", "ntp"]
    for method, s in summary.items():
        accuracies = [r["accuracy"] for r in runs if r["method"] == method]
        assert math.isclose(s["mean"], sum(accuracies) / 2) and s["accuracy"] == accuracies
        assert [(b["min"], b["max"]) for b in s["by_distance"]] == [(0, 128), (128, 160), (160, 192), (192, None)]
    assert runs[0]["answers"] == 4 * 8  # samples x num_pairs
    assert (sweep / "ablation.md").read_text() == markdown(summarize(runs), 4 * 8)
    assert (sweep / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = next(sweep.glob("wandb/offline-run-*/run-*.wandb"))
    assert b"ablation/ntp/mean_accuracy" in report.read_bytes()
    assert b"eval/accuracy" in wandb_history_file(sweep / "0").read_bytes()


def test_the_summary_spreads_over_seeds():
    def run(method, seed, accuracy):
        buckets = [{"min": 0, "max": 10, "answers": 2, "accuracy": accuracy}, {"min": 10, "max": None, "answers": 0,
                   "accuracy": None}]  # fmt: skip
        return {"method": method, "seed": seed, "final_loss": 1.0, "accuracy": accuracy, "answers": 2,
                "by_distance": buckets}  # fmt: skip

    summary = summarize([run("ntp", 1, 0.5), run("none", 0, 0.1), run("ntp", 0, 0.9)])
    assert list(summary) == ["none", "ntp"]  # the table's method order, not the runs'
    ntp = summary["ntp"]
    assert ntp["seeds"] == [0, 1] and ntp["accuracy"] == [0.9, 0.5]
    assert math.isclose(ntp["mean"], 0.7) and math.isclose(ntp["std"], math.sqrt(0.08))
    assert ntp["by_distance"][0]["accuracy"] == 0.7 and ntp["by_distance"][1]["accuracy"] is None
    assert "| ntp | 0.700 ± 0.283 (0.500-0.900) | 2 |" in markdown(summary, 2)


def test_context_parallel_runs_give_the_numbers_of_one_process(tmp_path):
    results = {}
    for name, parallel in (("cp1", "parallel=single"), ("cp2", "parallel=default")):
        run_dir = tmp_path / name
        cli("experiment=recall_ablation", "ttt.method=ntp", parallel, *SHORT, f"hydra.run.dir={run_dir}",
            "logging.wandb.mode=disabled")  # fmt: skip
        results[name] = (metrics(run_dir), json.loads((run_dir / "eval.json").read_text()))
    (rows1, eval1), (rows2, eval2) = results["cp1"], results["cp2"]
    for a, b in zip(rows1, rows2, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
    assert eval1 == eval2
