"""`tools.studies.lm_study`: the from-scratch grid runs end to end on a tiny model (two steps per arm), its report
and scores read what the runs wrote, and a second call finds every run done."""

from __future__ import annotations

import json
import math

from tools.studies.lm_study import DEFAULT_ARMS, main, region_means, run_grid

TINY = [
    "train.steps=2", "data.seq_len=128", "data.batch_size=1", "model.config.hidden_size=32",
    "model.config.intermediate_size=64", "model.config.num_hidden_layers=2", "model.config.head_dim=8",
    "model.config.sliding_window=16", "model.ttt_defaults.chunk_size=16", "model.ttt_defaults.layers=[1]",
]  # fmt: skip


def test_the_grid_runs_scores_and_reports_every_arm(tmp_path, capsys):
    out = tmp_path / "study"
    report = run_grid(out, list(DEFAULT_ARMS), [0], TINY, jobs=2, reference="global")
    runs = report["runs"]
    assert list(runs) == list(DEFAULT_ARMS)
    layer_types = (out / "runs" / "global-seed0" / ".hydra" / "config.yaml").read_text()
    assert "- sliding_attention\n    - full_attention" in layer_types  # the last of the 2 layers attends globally
    for arm, (run,) in runs.items():
        assert run["steps"] == 2 and (run["window"], run["reach"], run["length"]) == (16, 32, 128)
        assert all(math.isfinite(run["regions"][region]) for region in ("within", "reach", "beyond")), arm
        assert run["documents"] > 0 and [b["end"] for b in run["buckets"]] == list(range(16, 129, 16))
    table, by_position = (out / "report.md").read_text().split("\n\n")
    table, by_position = table.splitlines(), by_position.splitlines()
    assert len(table) == 2 + len(DEFAULT_ARMS) and "beyond the reach [32, 128)" in table[0]
    assert by_position[0].endswith("| [0, 16) | [16, 32) | [32, 64) | [64, 128) |") and len(by_position) == 6
    assert [line.split(" | ")[0] for line in by_position[2:]] == ["| global", "| nomem", "| ntp", "| inplace"]
    assert table[2].startswith("| none | 0 |") and table[3].startswith("| global | 0 |")
    shares = [line.split(" | ")[7] for line in table[2:]]  # "-" when, after two steps, global is not below none
    assert shares[0] in ("0.0%", "-") and shares[1] in ("100.0%", "-")
    assert (out / "heldout_nll.png").stat().st_size > 0

    metrics = out / "runs" / "ntp-seed0" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime_ns
    again = run_grid(out, ["ntp"], [0], TINY, jobs=1, reference="global")["runs"]
    assert again["ntp"][0]["regions"] == runs["ntp"][0]["regions"] and list(again) == list(DEFAULT_ARMS)
    assert metrics.stat().st_mtime_ns == stamp  # kept, not retrained

    main(["speed", "--out", str(out), "--arms", "none,ntp", "--steps", "1", "--", *TINY])
    table = (out / "report.md").read_text().split("\n\n")[0].splitlines()
    assert "train tokens/s, one core, alone" in table[0] and len(table) == 2 + len(DEFAULT_ARMS)
    speed = [line.split(" | ")[8] for line in table[2:]]
    assert float(speed[0].replace(",", "")) > 0 and speed[1] == "-"  # none measured, global not asked for

    capsys.readouterr()
    data = out / "data"
    main(["score", str(out / "runs" / "ntp-seed0"), "--data", str(data / "heldout.jsonl"),
          "--tokenizer", str(data / "bpe4096"), "--documents", "3"])  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["documents"] == 3 and set(printed) == {"documents", "within", "reach", "beyond"}


def test_regions_are_token_weighted_means_of_their_buckets():
    buckets = [
        {"start": a, "end": a + 4, "tokens": n, "nll": nll}
        for a, n, nll in ((0, 3, 2.0), (4, 4, 1.0), (8, 4, 3.0), (12, 2, 6.0))
    ]
    means = region_means(buckets, {"window": 4, "reach": 8, "length": 16})
    assert means == {"within": 2.0, "reach": 1.0, "beyond": (4 * 3.0 + 2 * 6.0) / 6}


def test_bad_arguments_are_one_line(tmp_path, capsys):
    for argv, message in (
        (["run", "--out", str(tmp_path), "--arms", "none,bogus"], "expected names from none, global"),
        (["score", str(tmp_path), "--data", "x.jsonl", "--tokenizer", str(tmp_path)], "neither a checkpoint"),
    ):
        try:
            main(argv)
        except SystemExit as exit_info:
            assert exit_info.code != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
