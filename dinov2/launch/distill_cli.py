"""``dinov2-distill --config PATH [key=value …]``: ``dinov2-train`` with ``distill.enabled=true``."""

from __future__ import annotations

import sys

from dinov2.launch.train_cli import main as train_main

DESCRIPTION = (
    "Distil a student ViT from a frozen teacher (ours, timm or HF DINOv2 weights): dinov2-train with "
    "distill.enabled=true. Example: dinov2-distill --config configs/distill/vitg14_to_vits14.yaml "
    "distill.teacher_checkpoint=outputs/vitg14 train.output_dir=outputs/distill"
)


def main(argv: list[str] | None = None) -> int:
    return train_main(argv, prog="dinov2-distill", description=DESCRIPTION, forced=["distill.enabled=true"])


if __name__ == "__main__":
    sys.exit(main())
