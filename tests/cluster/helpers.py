"""Helpers for the cluster tests: run the CLI, poll conditions, read the registry."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, TypeVar

import pytest

from hpc_serve.demo import localcluster
from hpc_serve.registry import BEATS, CorruptRecord, Deployment

T = TypeVar("T")

HPC_SERVE = [sys.executable, "-m", "hpc_serve"]


def _default_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


#: Popen arguments for a CLI process a test interrupts with SIGINT (Ctrl-C): a shell that runs the
#: tests in the background ignores SIGINT, and its children would inherit that.
CTRL_C_ABLE = {"preexec_fn": _default_sigint}


def run_cli(*args: str, env: dict | None = None, cwd: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*HPC_SERVE, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def wait_for(condition: Callable[[], T], timeout: float, what: str | Callable[[], str],
             poll: float = 0.1) -> T:
    """Poll ``condition`` until truthy and return its value; fail naming ``what`` on timeout
    (a callable ``what`` is asked then, so that it can say how things stand at that moment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")


def holds_for(condition: Callable[[], object], duration: float, what: str, poll: float = 0.2) -> None:
    """Check ``condition`` for ``duration`` seconds, for a scenario that is a span of time (a wait
    that must outlive its timeout); fail at the first moment it is false, naming ``what``."""
    start = time.monotonic()
    while True:
        if not condition():
            pytest.fail(f"{what}: no longer true {time.monotonic() - start:.1f} s in (of {duration:.0f} s)")
        if time.monotonic() - start >= duration:
            return
        time.sleep(poll)


class StreamLines:
    """The lines a child process writes to a pipe, gathered by a thread as they come: a test waits
    for a line with a timeout instead of blocking on a read that may never return."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def wait_for_line(self, text: str, timeout: float, after: int = 0) -> int:
        """Wait for a line (from line ``after`` on) that contains ``text``; the index past it."""
        def found() -> int:
            return next((index + 1 for index in range(after, len(self.lines)) if text in self.lines[index]), 0)

        return wait_for(found, timeout, lambda: f"a line with {text!r} (got: {self.lines[after:]})")

    def text(self, timeout: float = 30) -> str:
        """Everything written, once the pipe has closed (the process has ended)."""
        self._reader.join(timeout)
        assert not self._reader.is_alive(), f"the pipe is still open after {timeout:.0f} s"
        return "".join(self.lines)


def squeue_ids(cluster) -> list[str]:
    done = subprocess.run(["squeue", "--noheader", "--format=%i"], env=cluster.env,
                          capture_output=True, text=True)
    return done.stdout.split()


def queue_state(cluster, job_id: str) -> str:
    """squeue's state and reason of one job, e.g. 'PENDING Resources' ('' once it has left, or
    when squeue fails: a wait on it then polls again)."""
    return subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%T %r"], env=cluster.env,
                          capture_output=True, text=True).stdout.strip()


def allocated_nodes(cluster, job_id: str) -> list[str]:
    """The nodes Slurm gave a running job, in Slurm's order."""
    record = subprocess.run(["scontrol", "show", "job", job_id], env=cluster.env, capture_output=True,
                            text=True, check=True).stdout
    nodelist = re.search(r"(?:^|\s)NodeList=(\S+)", record).group(1)
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], env=cluster.env, capture_output=True,
                          text=True, check=True).stdout.split()


def deployment(home: Path, job_id: str) -> Deployment:
    return Deployment(str(home), job_id)


def deployment_dir(home: Path, job_id: str) -> Path:
    return Path(deployment(home, job_id).path)


def read_state(home: Path, job_id: str) -> dict:
    try:
        return deployment(home, job_id).state
    except CorruptRecord:
        return {}


def phase_is(home: Path, job_id: str, *phases: str) -> Callable[[], dict | None]:
    """A condition for wait_for: the state once its phase is one of ``phases``."""
    def reached() -> dict | None:
        state = read_state(home, job_id)
        return state if state.get("phase") in phases else None

    return reached


def beat_count(home: Path, job_id: str, rank: int) -> int:
    """How often node ``rank``'s agent has beaten (its heartbeat thread's counter; 0: not yet)."""
    return deployment(home, job_id).rank_records(BEATS).get(rank, {}).get("beat", 0)


def all_nodes_reported(home: Path, job_id: str, count: int) -> bool:
    """Every node wrote its record and node 0 started the engine (phase LOADING)."""
    return len(deployment(home, job_id).nodes()) == count and read_state(home, job_id).get("phase") == "LOADING"


def job_processes(cluster) -> dict[str, list[str]]:
    """Command names of every process in each node's namespace, except slurmd itself."""
    out = {}
    for node in cluster.nodes:
        pids = localcluster.namespace_pids(cluster.namespace(node))
        names = []
        for pid in pids:
            try:
                names.append(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:
                continue
        out[node] = [n for n in names if n != "slurmd"]
    return out
