"""``dinov2-submit``: run ``dinov2-train`` on a SLURM cluster through submitit.

::

    dinov2-submit --config train/vitl14 --nodes 2 --gpus-per-node 8 --partition gpu --timeout 1440 \\
        train.output_dir=/shared/runs/vitl14 data.dataset.path=/shared/imagenet/train

The job runs one task per GPU (or ``--tasks-per-node`` CPU tasks); each task reads its rank from
SLURM's variables (``dinov2.distributed.env``) and the tasks form one process group.

Timeouts and preemption: submitit asks SLURM to send ``SIGUSR2`` ``--signal-delay-s`` seconds before
the time limit (and SLURM sends it on preemption). :class:`TrainJob` turns that signal — and
``SIGTERM``, which ``scontrol requeue`` / ``scancel`` / a preemption send — into a
:class:`~dinov2.distributed.stop.StopRequest`: at the next iteration all ranks agree, save a
checkpoint and leave the training loop. After ``SIGUSR2`` the job then requeues itself through
submitit (at most ``--max-requeues`` times for timeouts); after ``SIGTERM`` SLURM requeues it itself
when it was preempted or requeued. A requeued job runs the same :class:`TrainJob`, and the trainer
resumes from the newest checkpoint in ``train.output_dir``.

Nothing here is specific to a site: partition, account, QoS, constraints, extra ``#SBATCH`` options
(``--slurm-arg``) and setup lines (``--setup 'module load …'``) all come from the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dinov2.config import Config, ConfigError, load_config
from dinov2.distributed.stop import StopRequest
from dinov2.launch.run import train

REQUEUE_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's own setting for the signal it handles


def requeue_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit (``USR2`` unless overridden)."""
    name = os.environ.get(REQUEUE_SIGNAL_ENV, "USR2").upper().removeprefix("SIG")
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        raise ValueError(f"{REQUEUE_SIGNAL_ENV}={name!r} is not a signal name") from None


@dataclass
class TrainJob:
    """The callable submitit pickles and runs once per task (and again after each requeue)."""

    cfg: Config

    def __call__(self) -> dict[str, Any]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
        if cpus.isdigit() and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(int(cpus))  # not every core of the node: only this task's share
        requeue = requeue_signal()
        # submitit installed its handler for `requeue` before calling us: keep it to requeue later
        submitit_handler = signal.getsignal(requeue)
        # a collective check is an all-reduce and a host sync: not every iteration (SLURM signals come
        # --signal-delay-s before the limit, far more than a few iterations)
        stop = StopRequest(check_every=self.cfg.train.stop_check_every)
        with stop.handling([requeue, signal.SIGTERM]):
            result = train(self.cfg, stop)
        summary = {
            "output_dir": str(result.output_dir),
            "iterations": result.iterations,
            "interrupted": result.interrupted,
            "reason": stop.reason if result.interrupted else "",
            "last_losses": result.last_losses,
            "knn": result.knn,
            "knns": result.knns,
        }
        if result.interrupted and stop.signum == int(requeue) and callable(submitit_handler):
            # rank 0: submitit calls self.checkpoint(), dumps it, runs `scontrol requeue` and exits;
            # the other ranks return (the requeue ends their step)
            submitit_handler(int(requeue), None)
        return summary

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """What submitit resubmits after a timeout or preemption: this very job. The trainer state is
        in ``train.output_dir`` (saved before this is called), so nothing else needs carrying over."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dinov2-submit",
        description="Submit dinov2-train to SLURM (submitit). The job checkpoints and requeues itself on "
        "timeout or preemption and resumes from train.output_dir. Example: dinov2-submit --config "
        "train/vits14 --nodes 1 --gpus-per-node 8 --partition gpu --timeout 1440 train.output_dir=/shared/run",
    )
    parser.add_argument("--config", required=True, help="YAML file or preset name such as train/vits14")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.base_lr=1e-3")
    res = parser.add_argument_group("resources")
    res.add_argument("--nodes", type=int, default=1)
    res.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU (default 0: CPU)")
    res.add_argument(
        "--tasks-per-node", type=int, default=None, help="processes per node (default: --gpus-per-node, or 1)"
    )
    res.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per task (data workers + 1)")
    res.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: the cluster's)")
    res.add_argument("--timeout", type=int, default=1440, help="time limit per run in minutes (default 1440)")
    sched = parser.add_argument_group("scheduling")
    sched.add_argument("--partition", default=None)
    sched.add_argument("--account", default=None)
    sched.add_argument("--qos", default=None)
    sched.add_argument("--constraint", default=None)
    sched.add_argument("--job-name", default="dinov2")
    sched.add_argument(
        "--slurm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra #SBATCH option, e.g. --slurm-arg exclusive=true --slurm-arg reservation=r1 (repeatable)",
    )
    sched.add_argument(
        "--setup", action="append", default=[], metavar="CMD", help="shell line run before the tasks (repeatable)"
    )
    life = parser.add_argument_group("requeue and logs")
    life.add_argument(
        "--max-requeues", type=int, default=3, help="requeues allowed after timeouts (preemptions are unlimited)"
    )
    life.add_argument(
        "--signal-delay-s", type=int, default=120, help="seconds before the time limit at which the job checkpoints"
    )
    life.add_argument("--log-dir", default=None, help="submitit logs and pickles (default: OUTPUT_DIR/slurm)")
    life.add_argument("--wait", action="store_true", help="wait for the job (across requeues) and print its result")
    life.add_argument("--dry-run", action="store_true", help="print the SLURM parameters and do not submit")
    return parser.parse_intermixed_args(argv)


def _parse_slurm_args(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise ConfigError(f"--slurm-arg '{item}' is not of the form KEY=VALUE")
        out[key] = True if not sep or value.lower() == "true" else value
    return out


def slurm_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """``SlurmExecutor.update_parameters`` keywords for the parsed command line."""
    if args.nodes < 1:
        raise ConfigError("--nodes must be >= 1")
    if args.gpus_per_node < 0:
        raise ConfigError("--gpus-per-node must be >= 0")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else max(1, args.gpus_per_node)
    if tasks < 1:
        raise ConfigError("--tasks-per-node must be >= 1")
    params: dict[str, Any] = {
        "job_name": args.job_name,
        "nodes": args.nodes,
        "ntasks_per_node": tasks,
        "time": args.timeout,
        "signal_delay_s": args.signal_delay_s,
        "stderr_to_stdout": True,
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task is not None:
        params["cpus_per_task"] = args.cpus_per_task
    if args.mem_gb is not None:
        mem = args.mem_gb
        params["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    if args.setup:
        params["setup"] = list(args.setup)
    extra = _parse_slurm_args(args.slurm_arg)
    if extra:
        params["additional_parameters"] = extra
    return params


def prepare_config(cfg: Config) -> Config:
    """The config as the job will see it: an absolute output dir (tasks may start elsewhere), no
    progress bar (logs are files)."""
    output_dir = Path(cfg.train.output_dir).expanduser().resolve()
    return replace(cfg, train=replace(cfg.train, output_dir=str(output_dir), progress=False))


def submit(cfg: Config, params: dict[str, Any], log_dir: str | Path, max_requeues: int = 3):
    """Submit :class:`TrainJob` with ``params`` (SlurmExecutor keywords); returns the submitit job."""
    import submitit

    executor = submitit.SlurmExecutor(folder=str(log_dir), max_num_timeout=max_requeues)
    executor.update_parameters(**params)
    return executor.submit(TrainJob(cfg))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = prepare_config(load_config(args.config, args.overrides))
        params = slurm_parameters(args)
    except ConfigError as e:
        print(f"dinov2-submit: error: {e}", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir).expanduser().resolve() if args.log_dir else Path(cfg.train.output_dir) / "slurm"
    if args.dry_run:
        print(json.dumps({"log_dir": str(log_dir), "output_dir": cfg.train.output_dir, **params}, indent=2))
        return 0
    try:
        job = submit(cfg, params, log_dir, args.max_requeues)
    except (RuntimeError, OSError) as e:  # no srun/sbatch here, or sbatch refused the job
        print(f"dinov2-submit: error: {e}", file=sys.stderr)
        return 1
    print(f"submitted job {job.job_id}: output {cfg.train.output_dir}, logs {log_dir}")
    if not args.wait:
        return 0
    return _wait(job)


def _wait(job, poll_s: float = 10.0) -> int:
    """Follow the job until it has a result (requeues keep the same id); print it."""
    while not job.done():
        time.sleep(poll_s)
    try:
        summary = job.result()
    except Exception as e:  # the job's exception, re-raised by submitit with the remote traceback
        print(f"dinov2-submit: job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0 if not summary.get("interrupted") else 3


if __name__ == "__main__":
    sys.exit(main())
