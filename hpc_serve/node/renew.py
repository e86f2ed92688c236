"""`--auto-renew`: before the time limit, node 0 submits a successor job that takes over once READY.

The successor is the same job: its own batch script (`scontrol write batch_script`), with the
running job's partition, account, QOS, time limit, name and working folder; a submitit job also
gets a copy of its pickled task. It is submitted held, given its registry entry (spec, plan,
`predecessor`), then released. When it is READY, the old deployment records STOPPED ("replaced by
its successor"), withdraws its endpoint and cancels its own job (``cancel_replaced_job``: a Slurm
that refuses or does not answer is noted in the state's reason, and the job then ends at its time
limit). Every Slurm call goes through hpc_serve.slurm. Stdlib only.
"""

from __future__ import annotations

import os
import shutil
import time

from typing import Callable

from ..registry import API_KEY, JOB, PLAN, SPEC, TERMINAL, Deployment, Registry
from ..slurm import SlurmError, job_fields, release, run, sbatch, scancel, time_left

_COPIED_FIELDS = (("Partition", "--partition"), ("Account", "--account"), ("QOS", "--qos"),
                  ("TimeLimit", "--time"), ("JobName", "--job-name"))


class RenewalFailed(RuntimeError):
    """The successor could not be submitted (the message says why)."""


def submit_successor(dep: Deployment, job_id: str, renew_before_min: int) -> str:
    """Submit, register and release a copy of ``job_id``; return the successor's job id.
    RenewalFailed or SlurmError (which says what Slurm answered) when it cannot."""
    fields = job_fields(job_id)
    if not fields:
        raise RenewalFailed(f"scontrol show job {job_id} gave nothing to copy")
    script = dep.file("successor.sbatch")
    run(["scontrol", "write", "batch_script", job_id, script], timeout_s=60)
    args = ["--hold"] + [f"{flag}={fields[key]}" for key, flag in _COPIED_FIELDS
                         if fields.get(key) not in (None, "", "(null)", "UNLIMITED")]
    workdir = fields.get("WorkDir") or os.getcwd()
    env = {key: value for key, value in os.environ.items()  # not this job's own SLURM_* values
           if not key.startswith("SLURM_") or key == "SLURM_CONF"}
    new_id = sbatch([*args, script], cwd=workdir, env=env)
    try:
        _register(dep, job_id, new_id, renew_before_min)
    finally:
        release(new_id)
    return new_id


def _register(dep: Deployment, job_id: str, new_id: str, renew_before_min: int) -> None:
    """The successor's registry entry, before it can start (its agents add to it)."""
    successor = Registry(dep.root).deployment(new_id).ensure()
    job = dict(dep.job)
    folder = job.get("submitit_folder")
    if folder:  # submitit runs the task pickled for the job id: the successor gets a copy
        new_folder = os.path.join(os.path.dirname(folder), new_id)
        os.makedirs(new_folder, mode=0o700, exist_ok=True)
        shutil.copy(os.path.join(folder, f"{job_id}_submitted.pkl"),
                    os.path.join(new_folder, f"{new_id}_submitted.pkl"))
        job["submitit_folder"] = new_folder
    for name in (SPEC, PLAN):
        successor.write(name, dep.read(name, {}))
    key = dep.api_key
    if key:  # the same key: clients keep working across the hand-over
        successor.write_secret(API_KEY, key)
    successor.write(JOB, {**job, "job_id": new_id, "slurm_job_id": new_id, "submitted": time.time(),
                          "predecessor": job_id})
    successor.init_phase("PENDING", f"successor of {job_id}, submitted {renew_before_min} min before "
                                    "its time limit")


class Renewal:
    """Node 0's hand-over to a successor: when to submit it, and whether it serves yet."""

    def __init__(self, dep: Deployment, job_id: str, renew_before_min: int,
                 log: Callable[[str], None]) -> None:
        self.dep, self.job_id, self.renew_before_min, self.log = dep, job_id, renew_before_min, log
        self.due_at: float | None = None
        self.successor: str | None = None
        self.given_up = False

    def start(self) -> None:
        """At READY: plan the successor's submission ``renew_before_min`` before the limit."""
        try:
            left, why = time_left(self.job_id), ""
        except SlurmError as exc:
            left, why = None, f" ({exc.problem})"
        if left is None:
            self.log(f"--auto-renew: Slurm does not say how much time the job has left{why}; no successor")
            self.given_up = True
            return
        wait_s = max(0.0, left - self.renew_before_min * 60)
        self.due_at = time.monotonic() + wait_s
        self.log(f"--auto-renew: {left:.0f} s left; a successor is submitted in {wait_s:.0f} s")

    def step(self) -> Deployment | None:
        """Called while READY: submits when due; returns the successor once it is READY."""
        if self.given_up or self.due_at is None or time.monotonic() < self.due_at:
            return None
        if self.successor is None:
            try:
                self.successor = submit_successor(self.dep, self.job_id, self.renew_before_min)
            except (RenewalFailed, SlurmError, OSError) as exc:
                why = exc.problem if isinstance(exc, SlurmError) else exc
                self.log(f"--auto-renew: could not submit a successor ({why}); serving until the limit")
                self.given_up = True
                return None
            self.log(f"--auto-renew: submitted successor {self.successor}")
            state = self.dep.state
            self.dep.set_phase(state.get("phase", "READY"), state.get("reason", ""), successor=self.successor)
            return None
        successor = Registry(self.dep.root).deployment(self.successor)
        phase = successor.phase
        if phase == "READY":
            return successor
        if phase in TERMINAL:
            self.log(f"--auto-renew: successor {self.successor} ended {phase}; serving until the limit")
            self.given_up = True
        return None


def cancel_replaced_job(dep: Deployment, job_id: str, log: Callable[[str], None],
                        timeout_s: float = 30.0) -> bool:
    """After the hand-over (STOPPED recorded, endpoint withdrawn): end this job. When Slurm
    refuses or does not answer, say so in the state's reason and the log, and return False."""
    try:
        scancel(job_id, timeout_s)
        return True
    except SlurmError as exc:
        state = dep.state
        note = f"could not cancel job {job_id}: {exc.problem}"
        dep.set_phase(state.get("phase", "STOPPED"), f"{state.get('reason', '')}\n({note})".lstrip("\n"))
        log(f"--auto-renew: {note}")
        return False
