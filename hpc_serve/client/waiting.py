"""Waiting until a deployment serves: the registry's phase, and squeue while the job is queued.

The registry (a file) is read four times a second; Slurm is asked at most every
``QUEUE_POLL_S`` seconds, so that a waiting user never hammers a shared slurmctld. A timeout
counts from when the job started running, never while it is queued.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .control import DeploymentStatus, describe
from ..errors import HpcServeError
from ..registry import TERMINAL, Deployment, Registry, registry_root
from ..slurm import queue_position, queue_states

QUEUE_POLL_S = 2.0


class WaitFailed(HpcServeError):
    """The deployment ended, or did not serve within the timeout (exit code 1)."""

    exit_code = 1


@dataclass(frozen=True)
class Progress:
    """What a waiting user is shown: the status, the queue position, and the running time."""

    status: DeploymentStatus
    queue_position: int | None
    running_s: float | None
    waited_s: float

    def line(self) -> str:
        """One line, e.g. 'PENDING (Priority), 3rd in the queue' or 'LOADING: vLLM starting'."""
        row = self.status
        if row.slurm_state.startswith("PENDING") and row.phase == "PENDING":
            where = f", {_ordinal(self.queue_position)} in the queue" if self.queue_position else ""
            return f"queued: {row.slurm_state}{where}"
        if row.phase == "PENDING":
            return f"{row.slurm_state}: the job has started; waiting for its node agents"
        if row.phase == "RESTARTING" and row.slurm_state.startswith("PENDING"):
            held = " (Slurm holds a requeued job about 2 minutes)" if "BeginTime" in row.slurm_state else ""
            return f"RESTARTING: queued again: {row.slurm_state}{held}"
        first = row.reason.splitlines()[0] if row.reason else ""
        return f"{row.phase}" + (f": {first}" if first else "")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _job_id(dep: Deployment) -> str:
    job = dep.read("job.json", {}) or {}
    return str(job.get("slurm_job_id") or job.get("job_id") or dep.id)


def _started_at(dep: Deployment) -> float | None:
    """When the job started running, as its own node 0 recorded it."""
    timings = dep.read("timings/0.json", {}) or {}
    return timings.get("job_start") or timings.get("agent_start")


def wait_ready(target: Deployment | str, home: str | None = None, timeout_s: float | None = None,
               on_update: Callable[[Progress], None] | None = None) -> DeploymentStatus:
    """Block until READY and return its status; WaitFailed when it ends or the timeout passes."""
    dep = target if isinstance(target, Deployment) else Registry(registry_root(home)).find(target)
    job_id = _job_id(dep)
    begun = time.monotonic()
    queue: dict | None = None
    asked_at, seen_running_at, last_line, position = -QUEUE_POLL_S, None, None, None
    while True:
        now = time.monotonic()
        if now - asked_at >= QUEUE_POLL_S:
            queue, asked_at = queue_states([job_id]), now
            state = queue.get(job_id, ("", ""))[0] if queue else ""
            position = queue_position(job_id) if state == "PENDING" else None
        status = describe(dep, queue, accounting={})
        started = _started_at(dep)
        if started is None and (status.slurm_state == "RUNNING" or status.phase != "PENDING"):
            seen_running_at = seen_running_at or time.time()
        running_s = time.time() - (started or seen_running_at) if (started or seen_running_at) else None
        if status.phase == "RESTARTING":  # queued again: the timeout counts from the next start
            running_s = None
        progress = Progress(status, position, running_s, now - begun)
        if on_update is not None and progress.line() != last_line:
            last_line = progress.line()
            on_update(progress)
        if status.phase == "READY":
            return status
        if status.phase in TERMINAL:
            first = status.reason.splitlines()[0] if status.reason else "no reason recorded"
            raise WaitFailed(f"Deployment {dep.id} ended {status.phase}: {first}",
                             f"Details: hpc-serve status {dep.id}; logs: hpc-serve logs {dep.id}")
        if status.slurm_state in ("ENDED", "GONE"):
            raise WaitFailed(f"Job {job_id} left the queue before serving (phase {status.phase}).",
                             f"See why: hpc-serve logs {dep.id}; sacct -j {job_id}")
        if timeout_s is not None and running_s is not None and running_s > timeout_s:
            raise WaitFailed(f"Deployment {dep.id} is not READY {timeout_s:.0f} s after its job started "
                             f"(now {progress.line()}).",
                             f"It keeps running: hpc-serve wait {dep.id} again, or hpc-serve cancel {dep.id}.")
        time.sleep(0.25)
