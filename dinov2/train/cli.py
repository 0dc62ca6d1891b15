"""``dinov2-train --config PATH [key=value …]``: pretrain (or distill) a ViT."""

from __future__ import annotations

import argparse
import logging
import sys

from dinov2.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dinov2-train",
        description="Self-supervised ViT pretraining the DINOv2 way. Example: "
        "dinov2-train --config configs/train/demo.yaml train.output_dir=outputs/demo optim.epochs=5",
    )
    parser.add_argument("--config", required=True, help="YAML file or preset name such as train/vits14")
    parser.add_argument(
        "--init-from",
        metavar="RUN_DIR",
        help="start from the student, teacher and head weights of another run (no optimizer or data state), "
        "position embeddings resampled to this config's grid: the high-resolution phase (train/vit*14_highres)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.base_lr=1e-3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.init_from:
            cfg.train.init_from = args.init_from
        if cfg.train.init_from:
            from dinov2.train.init_from import check_init_from

            check_init_from(cfg.train.init_from, cfg)  # before anything is written
    except ConfigError as e:
        print(f"dinov2-train: error: {e}", file=sys.stderr)
        return 2
    from dinov2.distributed.env import read_env
    from dinov2.train.trainer import NonFiniteLossError, train

    try:
        result = train(cfg)
    except (NonFiniteLossError, FileNotFoundError, ConfigError) as e:
        print(f"dinov2-train: error: {e}", file=sys.stderr)
        return 1
    if read_env().rank != 0:  # one report per job, not per process
        return 0
    if result.last_losses:
        print(f"finished {result.iterations} iterations, final loss {result.last_losses.get('loss', float('nan')):.4f}")
    if result.num_skipped:
        print(f"skipped {result.num_skipped} undecodable images")
    main_name = "student" if cfg.distill.enabled else "teacher"
    exported = ({main_name: result.exported} if result.exported else {}) | result.extra_exports
    for name, path in exported.items():
        print(f"{name} backbone exported to {path}")
    knns = ({main_name: result.knn} if result.knn else {}) | result.extra_knn
    for name, knn in knns.items():
        table = "  ".join(f"k={k}: {acc:.2f}%" for k, acc in sorted(knn.items()))
        print(f"k-NN top-1 ({name}) on the held-out split: {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
