"""Why a run ends when a signal comes, decided before anything is stopped. Stdlib only.

A SIGTERM is not always a cancel. Node 0 tells apart: the user's `hpc-serve cancel` (which leaves
``cancel.json`` in the registry before it calls scancel), a plain scancel (every agent gets the
signal and Slurm says the job is CANCELLED or COMPLETING),
a requeue (preemption, `scontrol requeue`: the restart count grew), and the step being ended
because another node's task died (srun's ``--kill-on-bad-exit``): every agent that gets the
signal notes it in ``ends/<rank>.json`` at once, so a node whose note never comes had no agent
left to get it. That last case is a failure naming the node, and counts for ``--max-restarts``.
When node 0's own agent is the one that vanished, node 1 decides in its place. The time limit
(USR1 first) is TIMEOUT, as before.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ..registry import CANCEL, ENDS, TERMINAL, CorruptRecord, Deployment

#: How long the judging node waits for the others' notes (they come within milliseconds).
NOTE_WAIT_S = 2.0
_TIMEOUT_SIGNALS = ("SIGUSR1", "SIGUSR2")


@dataclass(frozen=True)
class Verdict:
    """The end to record: a phase and its reason (FAILED goes through the restart logic)."""

    phase: str
    reason: str


def note_signal(dep: Deployment, rank: int, restart: int, signame: str) -> None:
    """Say that this node's agent got ``signame`` (and so is alive and ending in order)."""
    os.makedirs(dep.file(ENDS), mode=0o700, exist_ok=True)
    dep.write(dep.rank_file(ENDS, rank), {"signal": signame, "restart": restart, "at": time.time()})


def _noted(dep: Deployment, restart: int) -> set[int]:
    """The ranks whose agent noted a signal in this run."""
    return {rank for rank, record in dep.rank_records(ENDS).items() if record.get("restart", 0) == restart}


def _cancelled_by_user(dep: Deployment, since: float) -> bool:
    try:
        at = (dep.read(CANCEL, {}) or {}).get("at")
        return at is not None and float(at) >= since
    except (CorruptRecord, TypeError, ValueError):
        return False


#: scontrol's budget when judging an end: two tries of 2.5 s (the agents have Slurm's KillWait).
_FIELDS_TIMEOUT_S, _FIELDS_ATTEMPTS = 2.5, 2


def _job_fields(job_id: str) -> dict[str, str]:
    """The job's scontrol fields; {} when it is not Slurm's or Slurm does not say in time."""
    if not job_id.isdigit():
        return {}
    from ..slurm import SlurmError, job_fields

    try:
        return job_fields(job_id, timeout_s=_FIELDS_TIMEOUT_S, attempts=_FIELDS_ATTEMPTS)
    except SlurmError:
        return {}


REQUEUED = ("requeued by Slurm (preemption, a node failure or scontrol requeue): it serves again "
            "once Slurm starts the job")


def judge(dep: Deployment, job_id: str, rank: int, restart: int, signame: str,
          since: float, note_wait_s: float = NOTE_WAIT_S) -> Verdict | None:
    """The end ``rank`` should record for this run after ``signame`` (None: not this node's to
    record, or already recorded). ``since``: when this run's agent started."""
    from .polling import wait_until
    if dep.phase in (*TERMINAL, "RESTARTING"):
        return None
    if rank == 0 and signame in _TIMEOUT_SIGNALS:
        return Verdict("TIMEOUT", f"received {signame}")
    if rank > 0:
        if rank != 1 or wait_until(lambda: 0 in _noted(dep, restart) or dep.phase in (*TERMINAL, "RESTARTING"),
                              note_wait_s, poll_s=0.05):
            return None  # node 0 is alive and records the end itself
    if _cancelled_by_user(dep, since):
        return Verdict("STOPPED", "cancelled (hpc-serve cancel)")
    nodes = dep.nodes(restart)
    failed = [record["failed"] for record in nodes.values() if record.get("failed")]
    if failed:
        return Verdict("FAILED", failed[0])
    fields = _job_fields(job_id) if signame == "SIGTERM" else {}
    restarts = fields.get("Restarts", "")
    if restarts.isdigit() and int(restarts) > restart:
        return Verdict("RESTARTING", REQUEUED)
    if rank == 0:
        others = set(nodes) - {0}
        wait_until(lambda: _noted(dep, restart) >= others, note_wait_s, poll_s=0.05)
        vanished = sorted(others - _noted(dep, restart))
    else:
        vanished = [0]
    if vanished and signame == "SIGTERM":
        who = vanished[0]
        host = nodes.get(who, {}).get("hostname", "?")
        return Verdict("FAILED", f"node {who} ({host}): its agent vanished (killed, or the node "
                                 "failed) and Slurm ended the job's step on every node")
    if fields.get("JobState") in ("CANCELLED", "COMPLETING"):  # scancel: every agent got the signal
        return Verdict("STOPPED", "cancelled (scancel)")
    return Verdict("STOPPED", f"received {signame}")
