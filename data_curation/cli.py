"""``dinov2-curate``: run curation stages on a work directory.

    dinov2-curate STAGE[,STAGE...] --workdir DIR [--config YAML] [--force] [key=value ...]
    dinov2-curate embed --workdir DIR [--shard-index I --num-shards N] [key=value ...]

Examples::

    dinov2-curate embed,dedup --workdir runs/cur embed.input.path=/data/images embed.model.path=runs/vits14
    dinov2-curate dedup --workdir runs/cur --config curation/default dedup.threshold=0.7
    dinov2-curate dedup,decontaminate,retrieve,manifest --workdir runs/cur --config my.yaml

Every stage is idempotent: a re-run with the same configuration and inputs returns at once. Every
filtering stage prints how many images it received and passed on. A problem with the input or the
settings ends the command with one line, ``dinov2-curate: error: …``, and exit status 2 (the full
traceback is logged at ``--log-level DEBUG``); a stage that stops this way has written nothing.

Stages are looked up in :data:`STAGES`, a table of ``name -> "module:function"``; each function
has the signature ``fn(workdir: Path, cfg: CurationConfig, force: bool) -> dict`` (a JSON-able
summary). A new stage is added by adding one entry; modules are imported only when their stage
runs, so the command starts quickly and faiss is only needed by the stages that use it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from data_curation.config import load_curation_config
from data_curation.errors import CurationError
from dinov2.config import ConfigError

STAGES = MappingProxyType(
    {
        "embed": "data_curation.embed:run_embed",
        "calibrate": "data_curation.calibrate:run_calibrate",
        "dedup": "data_curation.dedup:run_dedup",
        "decontaminate": "data_curation.decontaminate:run_decontaminate",
        "retrieve": "data_curation.retrieve:run_retrieve",
        "cluster": "data_curation.kmeans:run_cluster",
        "sample": "data_curation.sample:run_sample",
        "manifest": "data_curation.manifest:run_manifest",
        "export-shards": "data_curation.export_shards:run_export_shards",
        "pack": "data_curation.pack:run_pack",
        "report": "data_curation.report:run_report",
    }
)

StageFn = Callable[[Path, Any, bool], dict]


def get_stage(name: str) -> StageFn:
    """The function of stage ``name`` (imported on demand)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinov2-curate",
        description="Curate pretraining data from image embeddings, one resumable stage at a time.",
    )
    parser.add_argument("stages", help=f"stage or comma-separated stages: {', '.join(STAGES)}")
    parser.add_argument("--workdir", required=True, type=Path, help="work directory (read and written)")
    parser.add_argument("--config", default=None, help="YAML file or preset (e.g. curation/default)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="recompute even if the stage is done, and let dedup / decontaminate remove more than "
        "their max_removed_fraction",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument(
        "--shard-index",
        type=int,
        default=None,
        help="embed: this task's index among --num-shards tasks (default: the SLURM array task, else 0)",
    )
    parser.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="embed: number of tasks sharing the work; task i writes the data shards s with s %% n == i",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. dedup.k=32)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dinov2-curate``; returns the exit status."""
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    if logging.getLogger().level > logging.DEBUG:  # faiss's loader logs each CPU variant it could not load, at INFO
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        print(f"dinov2-curate: error: unknown stage(s) {unknown}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2

    try:
        cfg = load_curation_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"dinov2-curate: error: {e}", file=sys.stderr)
        return 2
    if (args.shard_index is None) != (args.num_shards is None):
        print("dinov2-curate: error: give --shard-index and --num-shards together", file=sys.stderr)
        return 2
    if args.num_shards is not None:
        if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
            print("dinov2-curate: error: need 0 <= --shard-index < --num-shards", file=sys.stderr)
            return 2
        cfg.embed.task_index, cfg.embed.num_tasks = args.shard_index, args.num_shards
    args.workdir.mkdir(parents=True, exist_ok=True)
    return run_stages(names, args.workdir, cfg, args.force)


def run_stages(names: Sequence[str], workdir: Path, cfg: Any, force: bool) -> int:
    """Run ``names`` in order, printing one JSON summary line each; 2 with one error line on a user error."""
    log = logging.getLogger("dinov2-curate")
    for name in names:
        try:
            summary = get_stage(name)(workdir, cfg, force)
        except (CurationError, ConfigError, ValueError, FileNotFoundError, ImportError) as e:
            log.debug("%s failed", name, exc_info=True)
            print(f"dinov2-curate: error: {error_line(name, e)}", file=sys.stderr)
            return 2
        print(json.dumps({"stage": name, **summary}, default=str))
        if summary.get("finalized") is False and name != names[-1]:
            # an array task of `embed`: the other tasks' shards are not all written yet
            log.info("embeddings not finalized yet: later stages not run")
            break
    return 0


def error_line(stage: str, error: BaseException) -> str:
    """The error as one line, prefixed with the stage unless the message names it already."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if text.startswith(stage) else f"{stage}: {text}"


if __name__ == "__main__":
    sys.exit(main())
