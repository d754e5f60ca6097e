"""A throw-away single-node SLURM cluster on 127.0.0.1 for tests (Debian ``slurm-wlm`` + ``munge``).

Everything lives under one temporary folder (munge key and socket, ``slurm.conf``,
``cgroup.conf``, spool, state and logs); the daemons run in the foreground as child processes
(``munged -F``, ``slurmctld -D``, ``slurmd -D``) so that :meth:`SlurmCluster.stop` ends exactly
those PIDs. Clients find the cluster through ``SLURM_CONF``; :meth:`SlurmCluster.env` gives the
environment to run ``sbatch``/``squeue`` (or a Nipype SLURM plugin run) against it.

The configuration follows CONVENTIONS §6 (``CgroupPlugin=cgroup/v1``, ``CgroupAutomount=no``,
``ProctrackType=proctrack/linuxproc``) and needs root (or the same user for all daemons).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")


def missing_binaries() -> list[str]:
    """The daemons/clients that are not on PATH (also looks in /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [name for name in BINARIES if shutil.which(name, path=path) is None]


def _which(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise FileNotFoundError(name)
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"timed out waiting for {what}\n{tail}")


class SlurmCluster:
    """munged + slurmctld + slurmd on 127.0.0.1, configured under ``root``."""

    def __init__(self, root: Path, *, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or max(1, len(os.sched_getaffinity(0)))
        self.processes: dict[str, subprocess.Popen] = {}
        self.node = "qsmnode"

    # -- configuration -------------------------------------------------------------------
    def _write_config(self) -> None:
        root = self.root
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "munge", 0o755)  # the socket must be reachable
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = root / "munge" / "munge.socket"
        user = _user_name()
        memory_mb = _memory_mb()
        lines = [
            "ClusterName=qsmtest",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            "MailProg=/bin/true",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "MinJobAge=5",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.node} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 "
            f"CPUs={self.cpus} RealMemory={memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf = root / "slurm.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for SLURM clients (and the jobs they submit) of this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + os.pathsep + "/usr/sbin"
        env.setdefault("LOGNAME", _user_name())
        return env

    # -- life cycle ----------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> SlurmCluster:
        self._write_config()
        root, env = self.root, self.env()
        log = root / "log"
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={root / 'munge' / 'munge.key'}",
                               f"--pid-file={root / 'munge' / 'munged.pid'}",
                               f"--seed-file={root / 'munge' / 'munged.seed'}",
                               f"--log-file={log / 'munged.log'}"], env)
        _wait(self.munge_socket.exists, 15, "munged", log / "munged.log")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env)
        _wait(lambda: self._client(["scontrol", "ping"]).stdout.find("UP") >= 0, timeout,
              "slurmctld", log / "slurmctld.log")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)],
                    env)
        _wait(lambda: self._client(["sinfo", "-h", "-n", self.node, "-o", "%t"])
              .stdout.strip() in ("idle", "mix", "alloc"), timeout, "slurmd (node idle)",
              log / "slurmd.log")
        return self

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        output = open(self.root / "log" / f"{name}.stdout", "wb")
        self.processes[name] = subprocess.Popen(command, stdout=output,
                                                stderr=subprocess.STDOUT, env=env)
        output.close()
        time.sleep(0.1)
        code = self.processes[name].poll()
        if code is not None:
            text = (self.root / "log" / f"{name}.stdout").read_text(errors="replace")
            raise RuntimeError(f"{name} exited with {code}: {text[-2000:]}")

    def _client(self, command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([_which(command[0]), *command[1:]], capture_output=True,
                              text=True, env=self.env(), check=False, timeout=30)

    def wait_jobs(self, job_ids: list[str], timeout: float) -> dict[str, str]:
        """Wait until the jobs left the queue; their final states (``sacct`` is off: scontrol)."""
        states: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        pending = set(job_ids)
        while pending and time.monotonic() < deadline:
            for job in sorted(pending):
                out = self._client(["scontrol", "show", "job", "-o", job]).stdout
                state = next((token.split("=", 1)[1] for token in out.split()
                              if token.startswith("JobState=")), "GONE")
                states[job] = state
                if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                    pending.discard(job)
            time.sleep(0.5)
        if pending:
            raise TimeoutError(f"jobs {sorted(pending)} still queued after {timeout} s")
        return states

    def stop(self) -> None:
        """End the daemons this object started, by PID (slurmd, slurmctld, munged)."""
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", "root")


def _memory_mb() -> int:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(1000, int(pages / 2**20 * 0.8))
    except (ValueError, OSError):
        return 4000
