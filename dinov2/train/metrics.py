"""Metrics sinks: JSON lines (always) and TensorBoard (when installed and enabled). Rank 0 only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 — closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard not installed: metrics go to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
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
