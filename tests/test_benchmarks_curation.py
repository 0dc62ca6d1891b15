"""``benchmarks/curation.py`` runs end to end on a small synthetic set and prints its table."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("faiss")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "curation.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("curation_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_curation_benchmark_prints_a_table(capsys):
    bench = load_benchmark()
    t0 = time.perf_counter()
    assert bench.main(["--rows", "20000", "--queries", "2000", "--device", "cpu"]) == 0
    seconds = time.perf_counter() - t0
    out = capsys.readouterr().out
    header, rule, *rows = [line for line in out.splitlines() if line.startswith("|")]
    assert [c.strip() for c in header.split("|")[1:]] == [
        "stage",
        "device",
        "rows",
        "seconds",
        "rows/s",
        "peak RSS",
        "notes",
    ]
    stages = [r.split("|")[1].strip() for r in rows]
    assert stages[1:] == [
        "dedup: index + k-NN pairs",
        "dedup: components + keep",
        "retrieval: index build",
        "retrieval: search",
        "k-means L1 (k=20)",
        "k-means L2 (k=2)",
    ]
    summary = bench.json.loads(out.strip().splitlines()[-1])
    assert summary["pair_recall"] > 0.95 and summary["pair_precision"] > 0.95
    assert summary["retrieval_precision"] > 0.9
    print(f"benchmark --rows 20000: {seconds:.1f} s")
