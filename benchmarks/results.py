"""A table benchmark's results as JSON, ``{"header": {...}, "rows": [{...}, ...]}``: written by ``--json``
and read back by ``--from-json`` (report a saved run without measuring again)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_results(path: str | Path, header: dict[str, str], rows: list[dict[str, Any]]) -> None:
    Path(path).write_text(json.dumps({"header": header, "rows": rows}, indent=1))


def load_results(path: str | Path) -> tuple[dict[str, str], list[dict[str, Any]]]:
    saved = json.loads(Path(path).read_text())
    return saved["header"], saved["rows"]
