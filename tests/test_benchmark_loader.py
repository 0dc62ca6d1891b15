"""``benchmarks/loader.py --tiny`` (the CI version of the loader benchmark) runs as a user runs it and
prints a table whose worker counts follow from its own rates."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import REPO


def test_loader_benchmark_tiny_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.common import parse_table
    from benchmarks.loader import STEP_RATES, main

    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\nkept text\n")
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "loader.py"), "--tiny", "--markdown", str(md),
         "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = parse_table(out.stdout.split("\n\n")[-1])
    assert [r["layout"] for r in rows] == ["shards", "folder", "blobs"]
    saved = json.loads((tmp_path / "rows.json").read_text())["rows"]
    for row, exact in zip(rows, saved, strict=True):
        assert row["images"] == "12" and exact["decode + augment img/s"] > 0
        assert exact["decode img/s"] > exact["decode + augment img/s"]  # augmenting costs more than decoding
        for model, step in STEP_RATES.items():
            column = f"workers for {model} ({step:.0f} img/s)"
            assert int(row[column]) == math.ceil(step / exact["decode + augment img/s"]) == exact[column]
    text = md.read_text()
    assert "kept text" in text and "<!-- loader-tiny:begin -->" in text and "not a measurement" in text
    assert main(["--from-json", str(tmp_path / "rows.json")]) == saved  # a saved run is reported the same way
    assert parse_table(capsys.readouterr().out.split("\n\n")[-1]) == rows
