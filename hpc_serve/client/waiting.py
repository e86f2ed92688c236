"""Waiting until a deployment serves: the registry's phase, and squeue while the job is queued.

The registry (a file) is read four times a second; Slurm is asked through the process's queue
watcher, at most every ``QUEUE_POLL_S`` seconds, so that a waiting user never hammers a shared
slurmctld. A timeout counts from when the job started running, never while it is queued. A Slurm
that does not answer is not an end: the wait says so and goes on, and gives up only after
``SLURM_PATIENCE_S`` without an answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .control import DeploymentStatus, describe, slurm_jobs
from ..errors import HpcServeError
from ..registry import TERMINAL, TIMINGS, Deployment, Registry, registry_root
from ..slurm import queue_watcher

#: How long the wait goes on while Slurm does not answer before it gives up (the job is not touched).
SLURM_PATIENCE_S = 300.0
#: How often the registry is read (a file: no Slurm call).
_REGISTRY_POLL_S = 0.25


class WaitFailed(HpcServeError):
    """The deployment ended, or did not serve within the timeout (exit code 1)."""

    exit_code = 1


@dataclass(frozen=True)
class Progress:
    """What a waiting user is shown: the status, the queue position, and the running time;
    ``slurm_silent``: why Slurm is not answering, while it is not (the wait gives up after
    ``slurm_patience_s`` of that)."""

    status: DeploymentStatus
    queue_position: int | None
    running_s: float | None
    waited_s: float
    slurm_silent: str = ""
    slurm_patience_s: float = SLURM_PATIENCE_S

    def line(self) -> str:
        """One line, e.g. 'PENDING (Priority), 3rd in the queue' or 'LOADING: vLLM starting'."""
        if not self.slurm_silent:
            return self._phase_line()
        base = "PENDING: no node agent has started yet" if self.status.phase == "PENDING" else self._phase_line()
        return (f"{base}; Slurm is not answering ({self.slurm_silent}), still waiting "
                f"(up to {self.slurm_patience_s / 60:g} min without an answer)")

    def _phase_line(self) -> str:
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


def _started_at(dep: Deployment) -> float | None:
    """When the job started running, as its own node 0 recorded it."""
    timings = dep.read(dep.rank_file(TIMINGS, 0), {}) or {}
    return timings.get("job_start") or timings.get("agent_start")


def wait_ready(target: Deployment | str, home: str | None = None, timeout_s: float | None = None,
               on_update: Callable[[Progress], None] | None = None,
               slurm_patience_s: float = SLURM_PATIENCE_S) -> DeploymentStatus:
    """Block until READY and return its status; WaitFailed when it ends, the timeout passes, or
    Slurm has not answered for ``slurm_patience_s``."""
    dep = target if isinstance(target, Deployment) else Registry(registry_root(home)).find(target)
    job_id, watched = dep.slurm_job_id, slurm_jobs([dep])  # none for the local executor
    begun = time.monotonic()
    seen_running_at, last_line = None, None
    while True:
        now = time.monotonic()
        view = queue_watcher().look(watched) if watched else None  # Slurm: at most once per QUEUE_POLL_S
        status = describe(dep, view)
        silent = view.error if view is not None else None
        position = queue_watcher().position(job_id) if status.phase == "PENDING" else None
        started = _started_at(dep)
        if started is None and (status.slurm_state == "RUNNING" or status.phase != "PENDING"):
            seen_running_at = seen_running_at or time.time()
        running_s = time.time() - (started or seen_running_at) if (started or seen_running_at) else None
        if status.phase == "RESTARTING":  # queued again: the timeout counts from the next start
            running_s = None
        progress = Progress(status, position, running_s, now - begun, silent.reason if silent else "",
                            slurm_patience_s)
        if on_update is not None and progress.line() != last_line:
            last_line = progress.line()
            on_update(progress)
        if status.phase == "READY":
            return status
        if status.phase in TERMINAL:
            first = status.reason.splitlines()[0] if status.reason else "no reason recorded"
            raise WaitFailed(f"Deployment {dep.id} ended {status.phase}: {first}",
                             f"Details: hpc-serve status {dep.id}; logs: hpc-serve logs {dep.id}")
        if silent is not None and view.silent_for_s > slurm_patience_s:
            raise WaitFailed(f"Slurm has not answered for {view.silent_for_s:.0f} s ({silent.reason}); "
                             f"stopped waiting for deployment {dep.id} (phase {status.phase}).",
                             f"It may still be running: check 'squeue -j {job_id}', then "
                             f"hpc-serve wait {dep.id} again.")
        if status.slurm_state in ("ENDED", "GONE") or (view is not None and job_id in view.ended):
            raise WaitFailed(f"Job {job_id} left the queue before serving (phase {status.phase}).",
                             f"See why: hpc-serve logs {dep.id}; sacct -j {job_id}")
        if timeout_s is not None and running_s is not None and running_s > timeout_s:
            raise WaitFailed(f"Deployment {dep.id} is not READY {timeout_s:.0f} s after its job started "
                             f"(now {progress.line()}).",
                             f"It keeps running: hpc-serve wait {dep.id} again, or hpc-serve cancel {dep.id}.")
        time.sleep(_REGISTRY_POLL_S)
