"""Metrics sinks: JSON lines (always) and TensorBoard (when installed and enabled). Rank 0 only.

Each ``metrics.jsonl`` row carries a ``timestamp`` (Unix seconds). A run resumed at iteration ``k``
first drops the rows of iterations ``>= k`` that the interrupted run wrote after its last checkpoint,
so each iteration appears once. TensorBoard comes with the ``tensorboard`` extra
(``pip install 'dinov2-train[tensorboard]'``); without it the hint is logged once per process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
_hinted_tensorboard = False


def _drop_rows_from(path: Path, start_iteration: int) -> None:
    """Rewrite ``path`` (atomically) without the rows of iterations ``>= start_iteration``."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a row cut short by a kill
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("iteration", -1) >= start_iteration:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)


class MetricsWriter:
    def __init__(
        self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True, start_iteration: int = 0
    ) -> None:
        global _hinted_tensorboard
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        _drop_rows_from(output_dir / "metrics.jsonl", start_iteration)
        self._jsonl = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 — closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if not _hinted_tensorboard:
                    logger.info(
                        "tensorboard is not installed: metrics go to metrics.jsonl only "
                        "(pip install 'dinov2-train[tensorboard]', or train.tensorboard=false)"
                    )
                    _hinted_tensorboard = True
            else:
                self._tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({**record, "timestamp": round(time.time(), 3)}) + "\n")
        self._jsonl.flush()
        if self._tb is not None and "iteration" in record:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, record["iteration"])

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``; for repeated iterations (a resumed run) the last one wins."""
    by_iteration: dict[int, dict[str, Any]] = {}
    other: list[dict[str, Any]] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "iteration" in record:
            by_iteration[record["iteration"]] = record
        else:
            other.append(record)
    return [by_iteration[k] for k in sorted(by_iteration)] + other
