"""``dinov2-train --config PATH [key=value …]``: pretrain (or distill, ``dinov2.launch.distill_cli``) a ViT.

Every check that needs no model or data (the configuration's values, the dataset kind, a run dir holding
another configuration, an unwritable output dir) runs first: a problem is one line
``dinov2-train: error: …`` on stderr, exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dinov2.config import ConfigError, load_config
from dinov2.distributed.env import read_env
from dinov2.distributed.plan import format_plan
from dinov2.launch.run import plan_shapes, train
from dinov2.train.checkpoint import CheckpointError
from dinov2.train.trainer import NonFiniteLossError

EXAMPLE = "dinov2-train --config configs/train/demo.yaml train.output_dir=outputs/demo optim.epochs=5"


def build_parser(prog: str = "dinov2-train", description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or f"Self-supervised ViT pretraining the DINOv2 way. Example: {EXAMPLE}",
    )
    parser.add_argument("--config", required=True, help="YAML file or preset name such as train/vits14")
    parser.add_argument(
        "--init-from",
        metavar="RUN_DIR",
        help="start from the student, teacher and head weights of another run (no optimizer or data state), "
        "position embeddings resampled to this config's grid: the high-resolution phase (train/vit*14_highres)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.base_lr=1e-3")
    plan = parser.add_argument_group("--plan: per-GPU memory and communication, no training (docs/launch.md)")
    plan.add_argument("--plan", action="store_true", help="print the memory/communication plan and exit")
    plan.add_argument("--world-size", type=int, default=8, help="GPUs in the job (8)")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, the default shard group (8)")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU to fit in (80)")
    plan.add_argument("--batch-sizes", default="", help="more batch sizes per GPU to tabulate, e.g. 8,16,32")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run_plan(args: argparse.Namespace, cfg) -> int:
    try:
        if args.world_size < 1 or args.gpus_per_node < 1 or args.gpu_memory_gib <= 0:
            raise ConfigError("--world-size, --gpus-per-node and --gpu-memory-gib must be positive")
        try:
            sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        except ValueError:
            raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: give integers separated by commas") from None
        if any(b < 1 for b in sizes):
            raise ConfigError("--batch-sizes must be positive")
        text, _ = format_plan(
            cfg, plan_shapes(cfg), args.world_size, args.gpus_per_node, args.gpu_memory_gib, sizes, args.config
        )
    except ConfigError as e:
        print(f"dinov2-train: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


def main(
    argv: list[str] | None = None,
    *,
    prog: str = "dinov2-train",
    description: str | None = None,
    forced: Sequence[str] = (),
) -> int:
    """Run the command; ``forced`` overrides come after the user's (``dinov2-distill``: distill.enabled=true)."""
    args = build_parser(prog, description).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, list(args.overrides) + list(forced))
        if args.init_from:
            cfg.train.init_from = args.init_from
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if args.plan:
        return run_plan(args, cfg)
    try:
        result = train(cfg)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    if read_env().rank != 0:  # one report per job, not per process
        return 0
    if result.last_losses:
        print(f"finished {result.iterations} iterations, final loss {result.last_losses.get('loss', float('nan')):.4f}")
    if result.num_skipped:
        print(f"skipped {result.num_skipped} undecodable images")
    for name, path in result.exports.items():
        print(f"{name} backbone exported to {path}")
    for name, knn in result.knns.items():
        table = "  ".join(f"k={k}: {acc:.2f}%" for k, acc in sorted(knn.items()))
        print(f"k-NN top-1 ({name}): {table}; {result.knn_description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
