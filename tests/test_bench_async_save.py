"""`tools.bench.async_save` on a very small model: both modes run and fill their row of the table."""

from __future__ import annotations

from tools.bench.async_save import main


def test_both_modes_fill_a_row(capsys):
    main(["--steps", "4", "--every", "2", "--hidden", "64", "--layers", "1"])
    table = capsys.readouterr().out.splitlines()
    rows = [line for line in table if line.startswith(("| in place |", "| async |"))]
    assert len(rows) == 2
    for row in rows:
        cells = [float(c) for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 5 and all(c > 0 for c in cells)
