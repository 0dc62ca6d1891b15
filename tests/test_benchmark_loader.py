"""``benchmarks/loader.py --tiny`` (the CI version of the loader benchmark) prints a table whose worker
counts follow from its own rates, and reports a saved run the same way."""

from __future__ import annotations

import json
import math

import torch
from conftest import REPO


def test_loader_benchmark_tiny_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.loader import STEP_RATES, main
    from benchmarks.tables import parse_table

    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\nkept text\n")
    threads = torch.get_num_threads()
    main(["--tiny", "--markdown", str(md), "--json", str(tmp_path / "rows.json")])
    assert torch.get_num_threads() == threads  # measured with one thread, as a worker; the caller's restored
    rows = parse_table(capsys.readouterr().out.split("\n\n")[-1])
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
