"""`tools.compare_ttt` trains methods side by side and, with --ppl-data, scores each run's held-out NLL by
position within and beyond attention's window."""

from __future__ import annotations

import json

from tools.compare_ttt import main


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
