"""A real one-node SLURM cluster (munged + slurmctld + slurmd) that the test suite starts itself.

The daemons run as root from a private directory with a generated ``slurm.conf``: free TCP ports, a
private munge socket, a random first job id (so two clusters on one machine never share a port or a
rendezvous port derived from a job id). :meth:`SlurmCluster.stop` cancels the jobs that are left and
stops exactly the daemons this object started, by their pid files.

Used by the ``slurm_cluster`` fixture in ``tests/conftest.py``; the packages come from
``tools/install_slurm.sh``.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")


class SlurmUnavailable(RuntimeError):
    """The cluster cannot be started here (not root, packages missing, daemons fail)."""


def which(program: str) -> str | None:
    return shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if which(p) is None]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free right now."""
    sockets, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def node_memory_mb(fraction: float = 0.8) -> int:
    """A RealMemory that fits this machine: ``fraction`` of MemTotal."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return max(1024, int(int(line.split()[1]) / 1024 * fraction))
    return 4096


# Job-step credential lifetime (s). It is also how long slurmd refuses to relaunch a job it has just
# killed ("Job credential revoked"): a requeued job must not start again sooner (SLURM's default: 120).
CRED_EXPIRE_S = 10

SLURM_CONF = """\
ClusterName=dinov2test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
FirstJobId={first_job_id}
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """One node called ``localhost`` with ``cpus`` CPUs and one partition ``debug``."""

    def __init__(self, root: str | Path | None = None, cpus: int | None = None, memory_mb: int | None = None):
        if root is None:
            # not under pytest's 0700 tmp dirs: munged runs as the munge user and must reach its socket
            root = tempfile.mkdtemp(prefix="dinov2-slurm-")
        self.root = Path(root)
        self.cpus = cpus or len(os.sched_getaffinity(0))
        self.memory_mb = memory_mb or node_memory_mb()
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.started: list[tuple[str, Path]] = []  # (daemon, pid file) in start order

    # ------------------------------------------------------------------------------- environment
    @property
    def env(self) -> dict[str, str]:
        """``os.environ`` plus what clients (sbatch, squeue, submitit) need to talk to this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
        return env

    def run(self, args: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    # ---------------------------------------------------------------------------------- start/stop
    def start(self, timeout: float = 60) -> SlurmCluster:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld/slurmd/munged needs root")
        gone = missing_programs()
        if gone:
            raise SlurmUnavailable(f"missing {', '.join(gone)} (run tools/install_slurm.sh as root)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        try:
            self._start_munge()
            ctld_port, slurmd_port = free_ports(2)
            self.conf.write_text(
                SLURM_CONF.format(
                    root=self.root,
                    ctld_port=ctld_port,
                    slurmd_port=slurmd_port,
                    munge_socket=self.munge_dir / "munge.socket",
                    cred_expire=CRED_EXPIRE_S,
                    first_job_id=random.randint(1000, 4_000_000),
                    cpus=self.cpus,
                    memory_mb=self.memory_mb,
                )
            )
            self._daemon("slurmctld", [which("slurmctld"), "-f", str(self.conf)], self.root / "slurmctld.pid")
            self._daemon("slurmd", [which("slurmd"), "-f", str(self.conf), "-N", "localhost"], self.root / "slurmd.pid")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        try:
            munge_user = pwd.getpwnam("munge")
        except KeyError as e:
            raise SlurmUnavailable("no 'munge' user (is the munge package installed?)") from e
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            mungekey = which("mungekey")
            if mungekey is None:
                raise SlurmUnavailable(f"{key} is missing and mungekey is not installed")
            subprocess.run([mungekey, "--create", f"--keyfile={key}"], check=True, capture_output=True)
            os.chown(key, munge_user.pw_uid, munge_user.pw_gid)
            key.chmod(0o600)
        self.munge_dir.mkdir(exist_ok=True)
        os.chown(self.munge_dir, munge_user.pw_uid, munge_user.pw_gid)
        self.munge_dir.chmod(0o755)
        pid_file = self.munge_dir / "munged.pid"
        cmd = [
            which("runuser"),
            "-u",
            "munge",
            "--",
            which("munged"),
            f"--socket={self.munge_dir / 'munge.socket'}",
            f"--pid-file={pid_file}",
            f"--log-file={self.munge_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ]
        self._daemon("munged", cmd, pid_file)

    def _daemon(self, name: str, cmd: list, pid_file: Path, timeout: float = 20) -> None:
        """Run a self-daemonizing program and wait until its pid file names a live process."""
        if any(c is None for c in cmd):
            raise SlurmUnavailable(f"cannot start {name}: a program is missing ({cmd})")
        proc = subprocess.run([str(c) for c in cmd], env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{name} failed to start: {proc.stderr.strip() or proc.stdout.strip()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = _read_pid(pid_file)
            if pid is not None and _alive(pid):
                self.started.append((name, pid_file))
                return
            time.sleep(0.1)
        raise SlurmUnavailable(f"{name} did not write {pid_file}; log: {self._tail(name)}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%T"], check=False, timeout=10)
            state = out.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise SlurmUnavailable(
            f"node not idle after {timeout:.0f} s (state '{state}'); slurmctld log: {self._tail('slurmctld')}"
        )

    def _tail(self, name: str, n: int = 15) -> str:
        log = self.munge_dir / "munged.log" if name == "munged" else self.root / f"{name}.log"
        try:
            return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job left, then stop the daemons this object started (newest first)."""
        if any(name == "slurmctld" for name, _ in self.started):
            self.run(["scancel", "--full", "--partition=debug"], check=False, timeout=20)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                out = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.5)
        for _name, pid_file in reversed(self.started):
            pid = _read_pid(pid_file)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.started.clear()

    # --------------------------------------------------------------------------------------- jobs
    def job_info(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict ({} when the controller no longer knows the job)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False, timeout=20)
        info: dict[str, str] = {}
        for item in out.stdout.split():
            if "=" in item:
                key, value = item.split("=", 1)
                info.setdefault(key, value)
        return info

    def wait_job(self, job_id: str | int, timeout: float, until: Sequence[str] = ("COMPLETED",)) -> dict[str, str]:
        """Poll until the job is in one of ``until`` or any other final state; returns its info."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in until or state in final:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not done after {timeout:.0f} s: {info.get('JobState')}")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
