"""Which tests of the fast loop take more than ~30 s (and so need ``@pytest.mark.slow``)?

    python tools/cpu_times.py tests/test_resume.py tests/test_wiring.py   # runs them (not slow, not slurm)
    python tools/cpu_times.py --junit report.xml                          # or reads a finished run

Runs pytest with ``-m "not slow and not slurm"`` and a JUnit report (each test's time includes its
setup, so a module fixture is charged to the first test that builds it), then prints every test over
``--limit`` seconds, and the total: the fast loop's estimate on this machine. Exit 1 when a test is
over the limit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path


def read_junit(path: Path) -> list[tuple[str, float, str]]:
    """(test id, seconds, outcome) of every test case in a JUnit XML report."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = tag
        out.append((name, float(case.get("time", 0.0)), outcome))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpu_times", description=__doc__.split("\n\n")[0])
    parser.add_argument("--junit", type=Path, default=None, help="read this report instead of running pytest")
    parser.add_argument("--limit", type=float, default=30.0, help="seconds above which a test should be slow")
    parser.add_argument("paths", nargs="*", default=["tests"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = args.junit
        if report is None:
            report = Path(tmp) / "junit.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow and not slurm"]
            subprocess.run([*cmd, f"--junitxml={report}", *args.paths], check=False)
        cases = read_junit(report)
    cases.sort(key=lambda c: -c[1])
    over = [c for c in cases if c[1] > args.limit]
    for name, seconds, outcome in over:
        print(f"{seconds:7.1f} s  {name}  ({outcome}) -> needs @pytest.mark.slow")
    print(f"{len(cases)} tests, {sum(c[1] for c in cases):.0f} s in all; slowest: ", end="")
    print(", ".join(f"{n.split('::')[-1]} {s:.1f} s" for n, s, _ in cases[:5]))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
