"""``dinov2-distill --config PATH [key=value …]``: ``dinov2-train`` with ``distill.enabled=true``."""

from __future__ import annotations

import sys

from dinov2.train.cli import main as train_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return train_main(argv + ["distill.enabled=true"])


if __name__ == "__main__":
    sys.exit(main())
