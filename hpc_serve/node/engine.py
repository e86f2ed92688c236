"""The processes a node agent starts, and the ones dead agents left: start, stop, find, end.

Stdlib only (runs inside the allocation). Every process is started in its own session so that
the agent can end it and all its children on every path, whatever Slurm's process tracking is,
and with a parent-death signal, so that it ends with its agent even when the agent is killed.
Each carries a marker (deployment and rank) in its environment, which every descendant
inherits: what left the process group is found by it, and so is what an agent killed with
SIGKILL left behind (the next agent on the node ends that). This module's one job is processes;
what goes in their environment is hpc_serve.node.environment's.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from typing import Callable

from ..planner.launch import Process
from .environment import cache_env
from .polling import wait_until

#: The environment variable that marks every process a node agent starts.
MARKER = "HPC_SERVE_PROCESS"
#: The signal an engine's process leader gets when its agent dies (vLLM and Ray then stop their
#: own children, as on a cancel).
PARENT_DEATH_SIGNAL = signal.SIGTERM
_PR_SET_PDEATHSIG = 1


class EngineProcess:
    """One planned process, in its own session, its output appended to ``log_path``.

    ``marker`` (deployment and rank) is put in its environment, which every descendant inherits:
    :meth:`stop` ends what left the process group too (Ray's workers start their own).
    """

    def __init__(self, process: Process, log_path: str, tmp_dir: str, marker: str) -> None:
        self.process, self.log_path, self.tmp_dir, self.marker = process, log_path, tmp_dir, marker
        self.popen: subprocess.Popen | None = None

    def start(self, cache_dir: str | None = None) -> None:
        """Start it; ``cache_dir`` is the compile cache setting (see :func:`cache_env`).
        RuntimeError when it cannot be started."""
        os.makedirs(os.path.join(self.tmp_dir, "tmp"), mode=0o700, exist_ok=True)
        env = {**os.environ, **dict(self.process.env)}
        env.update(cache_env(cache_dir, env))
        env.update({"TMPDIR": os.path.join(self.tmp_dir, "tmp"), MARKER: self.marker,
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.popen = subprocess.Popen(list(self.process.argv), env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, preexec_fn=parent_death_hook())
        except OSError as exc:
            raise RuntimeError(f"cannot start {self.process.argv[0]}: {exc.strerror}") from None
        finally:
            os.close(log)

    @property
    def exit_code(self) -> int | None:
        """Its exit code once it has ended, else None."""
        return None if self.popen is None else self.popen.poll()

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_s`` (marked strays too)."""
        if self.popen is not None and self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        if self.popen is not None:
            _signal_group(self.popen.pid, signal.SIGKILL)  # children that outlived their leader
            try:
                self.popen.wait(2)
            except subprocess.TimeoutExpired:
                pass
        _signal_all(marked_pids(self.marker), signal.SIGKILL)
        # a killed process still maps its /dev/shm files until it is gone: the cleanup that
        # follows spares files in use, so wait (bounded) until none of ours is left
        wait_until(lambda: not marked_pids(self.marker), 10)


def parent_death_hook() -> Callable[[], object] | None:
    """A function for the child to run before exec: it gets PARENT_DEATH_SIGNAL when the agent
    (the thread that started it) dies. None where prctl is missing (not Linux): there the next
    agent's sweep ends what a dead agent left. libc is looked up here, not after the fork."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    signum = int(PARENT_DEATH_SIGNAL)
    return lambda: prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


def own_pids() -> list[int]:
    """This user's processes, this one excepted."""
    pids = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and int(name) != os.getpid() and os.stat(f"/proc/{name}").st_uid == os.getuid():
                pids.append(int(name))
        except OSError:
            continue
    return pids


def marked_processes(prefix: str = "") -> dict[int, str]:
    """{pid: marker} of this user's processes whose marker starts with ``prefix``."""
    needle = f"\0{MARKER}={prefix}".encode()
    found: dict[int, str] = {}
    for pid in own_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                environ = b"\0" + handle.read()
        except OSError:
            continue
        at = environ.find(needle)
        if at >= 0:
            found[pid] = environ[at + len(MARKER) + 2:].split(b"\0", 1)[0].decode(errors="replace")
    return found


def marked_pids(marker: str) -> list[int]:
    """Our own processes whose environment carries exactly ``marker``."""
    return [pid for pid, value in marked_processes(marker).items() if value == marker]


def end_leftovers(live_jobs: set[str] | None, own_job: str, prefix: str = "") -> dict[str, list[int]]:
    """End the processes that agents of ended jobs left on this node (an agent killed with SIGKILL
    cannot stop its engine): only this user's, only those with our marker, never ``own_job``'s.
    A Slurm job counts as ended when it is not in ``live_jobs`` (all of this user's jobs Slurm
    knows; None: Slurm cannot say, so none is touched), a local one when its controller is gone.
    ``prefix`` limits it to markers that start with it. Returns {marker: pids} of what was ended."""
    left: dict[str, list[int]] = {}
    for pid, marker in marked_processes(prefix).items():
        job = marker.partition("/")[0]
        if job == own_job or not _job_gone(job, live_jobs):
            continue
        left.setdefault(marker, []).append(pid)
    pids = [pid for group in left.values() for pid in group]
    _signal_all(pids, signal.SIGTERM)
    if not wait_until(lambda: not any(_alive(pid) for pid in pids), 3.0):
        _signal_all(pids, signal.SIGKILL)
    return left


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _job_gone(job: str, live_jobs: set[str] | None) -> bool:
    """Whether job ``job`` has ended; a local job id names its controller's pid."""
    if job.isdigit():
        return live_jobs is not None and job not in live_jobs
    if job.startswith("local-") and job[6:].isdigit():
        return not _alive(int(job[6:]))
    return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which PID 1 may reap lazily, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
