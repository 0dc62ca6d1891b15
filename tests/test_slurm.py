"""``dinov2-submit`` on a real one-node SLURM cluster that the test session starts (``slurm`` marker).

The cluster (munged, slurmctld, slurmd; see ``tests/slurm_cluster.py``; the session fixture
``slurm_cluster`` is in ``conftest.py``) needs root and the Debian packages
(``tools/install_slurm.sh``, which ``make test`` runs). Without root the cluster tests are
skipped — except under ``CI=true``, where they must run and fail if the cluster cannot start.

* a 2-task CPU training job, submitted with the console script, gets the timeout/preemption signal
  (``SIGUSR2``, what SLURM sends ``--signal-delay-s`` before the time limit): both ranks checkpoint at
  the same iteration, the job requeues itself through submitit, resumes from that checkpoint and
  completes — every iteration logged exactly once, final checkpoint at the last iteration;
* ``scontrol requeue`` of a running job (``SIGTERM``): the job checkpoints, SLURM requeues it, it
  resumes and completes.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import CRED_EXPIRE_S, SlurmCluster
from tiny_config import TINY

from dinov2.config import load_config
from dinov2.launch.submit import TrainJob, main, parse_args, prepare_config, requeue_signal, slurm_parameters

ITERATIONS = 24
CKPT_EVERY = 6


# ---------------------------------------------------------------------------------- no cluster needed
def test_slurm_parameters_from_the_command_line():
    args = parse_args(
        [
            "--config",
            "train/vits14",
            "train.output_dir=x",
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--partition",
            "gpu",
            "--account",
            "acct",
            "--qos",
            "high",
            "--timeout",
            "90",
            "--mem-gb",
            "1.5",
            "--slurm-arg",
            "exclusive",
            "--slurm-arg",
            "reservation=r1",
            "--setup",
            "module load cuda",
            "optim.epochs=1",
        ]
    )
    assert args.overrides == ["train.output_dir=x", "optim.epochs=1"]
    params = slurm_parameters(args)
    assert params == {
        "job_name": "dinov2",
        "nodes": 2,
        "ntasks_per_node": 8,  # one task per GPU
        "gpus_per_node": 8,
        "time": 90,
        "signal_delay_s": 120,
        "stderr_to_stdout": True,
        "mem": "1536MB",
        "partition": "gpu",
        "account": "acct",
        "qos": "high",
        "setup": ["module load cuda"],
        "additional_parameters": {"exclusive": True, "reservation": "r1"},
    }
    cpu = slurm_parameters(parse_args(["--config", "train/demo", "--tasks-per-node", "2"]))
    assert cpu["ntasks_per_node"] == 2 and "gpus_per_node" not in cpu and "mem" not in cpu


def test_dry_run_and_config_errors(capsys, tmp_path):
    assert main(["--config", "train/demo", f"train.output_dir={tmp_path}/run", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["output_dir"] == str(tmp_path / "run") and printed["log_dir"] == str(tmp_path / "run" / "slurm")
    assert main(["--config", "train/demo", "train.no_such_key=1", "--dry-run"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_train_job_resubmits_itself(tmp_path, monkeypatch):
    cfg = prepare_config(load_config("train/demo", [f"train.output_dir={tmp_path}"]))
    assert Path(cfg.train.output_dir).is_absolute() and not cfg.train.progress
    job = TrainJob(cfg)
    again = job.checkpoint()
    assert again.function is job and again.args == () and again.kwargs == {}
    assert requeue_signal().name == "SIGUSR2"
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert requeue_signal().name == "SIGUSR1"


# ------------------------------------------------------------------------------------- the cluster
@pytest.fixture
def jobs(slurm_cluster):
    """Job ids a test submitted; whatever is still queued or running is cancelled afterwards, so a
    failed test does not hold the (session-wide) cluster's CPUs."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        slurm_cluster.run(["scancel", job_id], check=False)


def _submit(cluster: SlurmCluster, output_dir: Path, tasks: int) -> str:
    script = Path(sys.executable).parent / "dinov2-submit"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "dinov2.launch.submit"]
    cmd += [
        "--config",
        "train/demo",
        "--tasks-per-node",
        str(tasks),
        "--cpus-per-task",
        "1",
        "--mem-gb",
        "2",
        "--timeout",
        "10",
        "--partition",
        "debug",
        "--job-name",
        "dinov2-test",
        *TINY,
        "data.batch_size_per_gpu=4",
        "distributed.param_dtype=fp32",
        f"train.max_iterations={ITERATIONS}",
        f"train.checkpoint_every={CKPT_EVERY}",
        "train.keep_last_checkpoints=10",
        "train.stop_check_every=1",  # the tests check the exact iteration the signal was acted on
        "train.export_teacher=false",
        "eval.final_knn=false",
        f"train.output_dir={output_dir}",
    ]
    env = cluster.env
    env.pop("OMP_NUM_THREADS", None)  # the tasks take their thread count from --cpus-per-task
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def _wait_for(path: Path, cluster: SlurmCluster, job_id: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = cluster.job_info(job_id).get("JobState", "")
        if state in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT", "NODE_FAIL"):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert path.exists(), f"{path} never appeared (job {job_id}: {cluster.job_info(job_id).get('JobState')})"


def _previous_run_alive(job_id: str, output_dir: Path) -> bool:
    """Whether a process of the job's previous run is still alive: its srun or tasks (their command
    lines name the job's submitit folder) or a slurmstepd of one of its steps."""
    marks = (str(output_dir / "slurm"), f"slurmstepd: [{job_id}.")
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # not a process, or it just ended
            continue
        if any(mark in cmdline for mark in marks):
            return True
    return False


def _wait_requeued_then_release(cluster: SlurmCluster, job_id: str, output_dir: Path, timeout: float = 120) -> None:
    """Wait until the job is back in the queue, its first run's processes are gone and the killed run's
    credential has expired, then clear the start delay SLURM gives requeued jobs (SLURM's own delay is
    ``cred_expire`` + 1 s; starting sooner fails the launch with "Job credential revoked")."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = cluster.job_info(job_id)
        if int(info.get("Restarts", "0")) >= 1 and info.get("JobState") in ("PENDING", "RUNNING"):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"job {job_id} was not requeued: {info.get('JobState')} {info.get('Reason')}")
    # slurmd refuses to relaunch a job it has just killed until its credential expires
    requeued_at = time.monotonic()
    while (_previous_run_alive(job_id, output_dir) or time.monotonic() < requeued_at + CRED_EXPIRE_S + 2) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    if cluster.job_info(job_id).get("JobState") == "PENDING":
        cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)


def _job_log(output_dir: Path, job_id: str) -> str:
    log = output_dir / "slurm" / f"{job_id}_0_log.out"
    return log.read_text(errors="replace") if log.exists() else "(no log)"


def _check_completed_run(cluster: SlurmCluster, output_dir: Path, job_id: str) -> int:
    """The job completed after one requeue, resumed mid-run and logged every iteration exactly once.
    Returns the iteration it resumed at."""
    info = cluster.wait_job(job_id, timeout=300)
    log = _job_log(output_dir, job_id)
    assert info.get("JobState") == "COMPLETED", (
        f"{info}\n{log[-3000:]}\nslurmctld: {cluster._tail('slurmctld', 25)}\nslurmd: {cluster._tail('slurmd', 25)}"
    )
    assert int(info.get("Restarts", "0")) == 1
    resumed = re.search(r"resumed from \S+ckpt_(\d+) at iteration (\d+)", log)
    assert resumed, log[-4000:]
    at = int(resumed.group(2))
    assert 0 < at < ITERATIONS
    assert (output_dir / "checkpoints" / f"ckpt_{at:08d}").is_dir()  # the checkpoint taken on the signal
    # the first run logged 0..at-1, the second at..end: nothing repeated, nothing missing
    logged = [json.loads(line)["iteration"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(ITERATIONS))
    assert (output_dir / "checkpoints" / f"ckpt_{ITERATIONS:08d}" / ".metadata").is_file()
    with open(output_dir / "slurm" / f"{job_id}_0_result.pkl", "rb") as f:
        outcome, summary = pickle.load(f)
    assert outcome == "success" and summary["iterations"] == ITERATIONS and not summary["interrupted"]
    return at


def _interrupt_after_first_checkpoint(slurm_cluster, jobs, output_dir, tasks: int, command: list[str]) -> str:
    """Submit a ``tasks``-task job, run ``command + [job_id]`` once checkpoint CKPT_EVERY is written, and
    check that the requeued job resumed from a checkpoint written after the interruption and completed."""
    job_id = _submit(slurm_cluster, output_dir, tasks=tasks)
    jobs.append(job_id)
    _wait_for(output_dir / "checkpoints" / f"ckpt_{CKPT_EVERY:08d}" / ".metadata", slurm_cluster, job_id)
    slurm_cluster.run([*command, job_id])
    _wait_requeued_then_release(slurm_cluster, job_id, output_dir)
    # the interruption came after checkpoint CKPT_EVERY was complete: resuming there would mean no checkpoint on it
    assert _check_completed_run(slurm_cluster, output_dir, job_id) > CKPT_EVERY
    return job_id


@pytest.mark.slurm
def test_two_task_job_checkpoints_on_timeout_signal_requeues_and_resumes(slurm_cluster, jobs, tmp_path):
    output_dir = tmp_path / "run"
    # what SLURM sends --signal-delay-s before the time limit (and on preemption)
    job_id = _interrupt_after_first_checkpoint(slurm_cluster, jobs, output_dir, 2, ["scancel", "--signal=USR2"])
    log = _job_log(output_dir, job_id)
    assert "process group up: rank 0 of 2 (gloo, from slurm)" in log


@pytest.mark.slurm
def test_scontrol_requeue_checkpoints_and_resumes(slurm_cluster, jobs, tmp_path):
    _interrupt_after_first_checkpoint(slurm_cluster, jobs, tmp_path / "run", 1, ["scontrol", "requeue"])
