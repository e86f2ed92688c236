"""Reading and steering deployments from the login node: status, list, logs, cancel.

Status works without Slurm accounting: squeue first (one call for all deployments), the registry's
phase always, and sacct only for jobs that have left the queue. Slurm is asked through this
process's queue watcher (slurm.queue_watcher): at most once per slurm.QUEUE_POLL_S, however often
status, wait or cancel look, and a Slurm that does not answer reads UNKNOWN, never as an end.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterator

from ..errors import HpcServeError
from ..registry import ENDPOINT, JOB, ROUTER, STATE, TERMINAL, CorruptRecord, Deployment, Registry, registry_root
from ..slurm import QueueView, queue_watcher, scancel
from .metrics import EngineLoad

#: The Slurm state shown while squeue does not answer (the deployment counts as live).
SLURM_SILENT = "UNKNOWN (Slurm is not answering)"


@dataclass(frozen=True)
class DeploymentStatus:
    """One row of `hpc-serve status`."""

    id: str
    name: str
    model: str
    layout: str
    slurm_state: str
    phase: str
    reason: str
    endpoint: str
    age_s: float
    nodes_reported: int
    problem: str = ""
    restarts: tuple[str, ...] = ()  # why each earlier run ended: first lines, oldest first
    startup: tuple[tuple[str, float], ...] = ()  # (phase, seconds) to READY; `status ID` only
    preflight: tuple[dict, ...] = ()  # every node's preflight record (hpc_serve.node.preflight); `status ID` only
    load: tuple[EngineLoad, ...] = ()  # what vLLM's /metrics says now, per engine; `status ID` of a READY one
    load_error: str = ""  # why the load could not be read

    @property
    def live(self) -> bool:
        return self.phase not in TERMINAL and self.slurm_state not in ("ENDED", "GONE")

    def to_dict(self) -> dict:
        return {**asdict(self), "live": self.live,
                "startup": [{"phase": name, "seconds": round(seconds, 3)} for name, seconds in self.startup],
                "preflight": list(self.preflight), "load": [engine.to_dict() for engine in self.load]}


def _layout_text(spec: dict) -> str:
    lay = spec.get("layout") or {}
    if not lay:
        return "?"
    text = f"{lay['nodes']}x{lay['gpus_per_node']} tp{lay['tp']} pp{lay['pp']} dp{lay['dp']}"
    return text + (" ep" if lay.get("ep") else "") + f" {lay['launcher']}"


def _layout_of(spec: dict, job: dict) -> str:
    if job.get("kind") == ROUTER:
        return f"router of {len(job.get('slots', []))} ({job.get('executor', 'slurm')})"
    return _layout_text(spec)


def live_group_named(registry: Registry, name: str) -> bool:
    """Whether a live group (a router entry, hpc_serve.fleet) already has this name."""
    routers = []
    for dep in registry.all():
        try:
            if dep.job.get("kind") == ROUTER and dep.job.get("name") == name:
                routers.append(dep)
        except CorruptRecord:
            continue
    view = queue_view(routers) if routers else None
    return any(describe(dep, view).live for dep in routers)


def _local_alive(job: dict) -> bool:
    try:
        os.kill(int(job.get("slurm_job_id", "0")), 0)
        return True
    except (OSError, ValueError):
        return False


def slurm_jobs(deployments: list[Deployment]) -> list[str]:
    """The Slurm job ids of ``deployments`` (a local executor's are process ids: left out)."""
    jobs = []
    for dep in deployments:
        try:
            if dep.job.get("executor") != "local":
                jobs.append(dep.slurm_job_id)
        except CorruptRecord:
            jobs.append(dep.id)
    return jobs


def queue_view(deployments: list[Deployment]) -> QueueView | None:
    """Slurm's view of the deployments' jobs, from this process's watcher; None without squeue."""
    return queue_watcher().look(slurm_jobs(deployments))


def _slurm_state(job_id: str, view: QueueView | None) -> str:
    if view is None:
        return "n/a (no squeue)"
    if view.error is not None:
        return SLURM_SILENT
    entry = view.queued.get(job_id)
    if entry is None:
        return view.state(job_id) or "ENDED"
    if entry.state == "PENDING" and entry.reason not in ("None", ""):
        return f"PENDING ({entry.reason})"
    return entry.state


def describe(dep: Deployment, view: QueueView | None) -> DeploymentStatus:
    """Status of one deployment; a corrupt record is reported in ``problem``, never raised.

    ``view`` is Slurm's answer for the jobs (see queue_view); None: squeue is not installed.
    """
    problem = ""
    try:
        job, spec, state, slurm_job = dep.job, dep.spec, dep.state, dep.slurm_job_id
    except CorruptRecord as exc:
        job, spec, state, slurm_job, problem = {}, {}, {"phase": "UNKNOWN"}, dep.id, exc.problem
    phase = state.get("phase", "PENDING")
    if job.get("executor") == "local":
        slurm_state = "RUNNING" if _local_alive(job) else "ENDED"
    else:
        slurm_state = _slurm_state(slurm_job, view)
    submitted = job.get("submitted") or state.get("updated") or time.time()
    endpoint = (dep.read(ENDPOINT, {}) or {}).get("url", "") if not problem else ""
    restarts = tuple(entry["reason"].partition("\n")[0] for entry in state.get("history", ())
                     if entry.get("phase") == "RESTARTING")
    return DeploymentStatus(
        id=dep.id, name=job.get("name", ""), model=spec.get("model", "?"), layout=_layout_of(spec, job),
        slurm_state=slurm_state, phase=phase, reason=state.get("reason", ""), endpoint=endpoint,
        age_s=max(0.0, time.time() - submitted),
        nodes_reported=len(_safe_nodes(dep, state.get("restart", 0))), problem=problem, restarts=restarts)


def _safe_nodes(dep: Deployment, restart: int) -> dict:
    try:
        return dep.nodes(restart)
    except CorruptRecord:
        return {}


def _registry(home: str | None) -> Registry:
    return Registry(registry_root(home))


def statuses(home: str | None = None, include_ended: bool = False) -> list[DeploymentStatus]:
    """Every deployment's status (live ones only unless ``include_ended``)."""
    deployments = _registry(home).all()
    view = queue_view(deployments)
    rows = [describe(dep, view) for dep in deployments]
    return rows if include_ended else [row for row in rows if row.live or row.problem]


def status(key: str, home: str | None = None, live: bool = True) -> DeploymentStatus:
    """One deployment's status, by job id or name; ``live``: when READY, what its server is doing
    now (two samples of vLLM's /metrics, half a second apart)."""
    from .startup import preflight_rows, startup_phases

    dep = _registry(home).find(key)
    row = replace(describe(dep, queue_view([dep])), startup=startup_phases(dep), preflight=preflight_rows(dep))
    base = (dep.endpoint or {}).get("base")
    if live and row.phase == "READY" and row.live and base and dep.job.get("kind") != ROUTER:
        from .metrics import live_load

        load, problem = live_load(base, dep.api_key)
        row = replace(row, load=load, load_error=problem)
    return row


def serving(registry: Registry, dep: Deployment) -> Deployment:
    """Of a chain of renewals (--auto-renew), the deployment that serves now: ``dep`` when READY,
    else the successor it handed over to, or its READY predecessor while ``dep`` still loads."""
    for _ in range(1000):
        try:
            state, job = dep.state, dep.job
        except CorruptRecord:
            return dep
        if state.get("phase") == "READY":
            return dep
        if state.get("successor") and state.get("phase") in TERMINAL:
            dep = registry.deployment(state["successor"])
            continue
        before = registry.deployment(job["predecessor"]) if job.get("predecessor") else None
        return before if before is not None and before.phase == "READY" else dep
    return dep


def endpoint(key: str, home: str | None = None) -> dict:
    """A READY deployment's endpoint: id, url, base, host, hostname, port, model, served_model,
    api_key_file. HpcServeError, naming the phase, when it has none. A renewed deployment's id
    or name gives the endpoint of the job that serves now."""
    registry = _registry(home)
    dep = serving(registry, registry.find(key))
    row = status(dep.id, home)
    if row.problem:
        raise HpcServeError(f"Deployment {dep.id}: {row.problem}", "Inspect or delete that file.")
    if row.phase != "READY" or not row.live:
        if row.phase in TERMINAL or not row.live:
            raise HpcServeError(f"Deployment {dep.id} has ended ({row.phase}, Slurm: {row.slurm_state}); "
                                "it has no endpoint.", f"See why: hpc-serve status {dep.id}")
        raise HpcServeError(f"Deployment {dep.id} is {row.phase}, not READY yet: it has no endpoint.",
                            f"Wait for it: hpc-serve wait {dep.id}")
    try:
        data = dep.read(ENDPOINT, None)
    except OSError as exc:
        raise HpcServeError(f"Cannot read {dep.file(ENDPOINT)} ({exc.strerror}).",
                            "Check the registry folder's permissions (it should be yours, 0700).") from None
    if not data:
        raise HpcServeError(f"Deployment {dep.id} is READY but {dep.file(ENDPOINT)} is missing.",
                            f"Node 0 writes it when READY; see hpc-serve logs {dep.id}.")
    return {"id": dep.id, **data}


def log_lines(key: str, node: int = 0, home: str | None = None) -> tuple[str, list[str]]:
    """(path, lines) of a node's log; falls back to Slurm's output file before the agent starts."""
    dep = _registry(home).find(key)
    path = dep.log_path(node)
    if not os.path.exists(path):
        folder = dep.job.get("submitit_folder", "")
        fallback = os.path.join(folder, f"{dep.slurm_job_id}_{node}_log.out") if folder else ""
        if fallback and os.path.exists(fallback):
            path = fallback
        else:
            nodes = sorted(dep.nodes())
            raise HpcServeError(f"No log for node {node} of {dep.id} yet (phase {dep.phase}).",
                                f"Nodes with logs: {nodes or 'none yet'}; wait for the job to start.")
    with open(path, encoding="utf-8", errors="replace") as handle:
        return path, handle.read().splitlines()


#: How long an agent may still be ending after its job has left the queue (Slurm's KillWait).
AGENT_GRACE_S = 15.0
#: Slurm states (squeue's absence, or sacct's last word) of a job whose agents are done.
_JOB_ENDED = {"ENDED", "GONE", "CANCELLED", "COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
              "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def follow(key: str, node: int = 0, home: str | None = None, poll_s: float = 0.5) -> Iterator[str]:
    """Yield a node's log lines as they are written, until the deployment has ended."""
    path, lines = log_lines(key, node, home)
    yield from lines
    position = os.path.getsize(path)
    gone_since: float | None = None
    ending = False
    while True:
        with open(path, encoding="utf-8", errors="replace") as handle:
            handle.seek(position)
            chunk = handle.read()
            position = handle.tell()
        yield from chunk.splitlines()
        if ending:  # the read after the end was seen: lines written meanwhile are shown too
            return
        if not chunk:
            row = status(key, home)
            queued = row.slurm_state.split()[0] not in _JOB_ENDED and not row.slurm_state.startswith("n/a")
            if row.phase in TERMINAL and not queued:  # recorded, and the agents are done
                ending = True
                continue
            if row.phase in TERMINAL or not row.live:
                # the end is recorded before the agents stop their engines (or the job left the
                # queue without one): their last lines may still come
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > AGENT_GRACE_S:
                    ending = True
                    continue
        time.sleep(poll_s)


def renewal_chain(registry: Registry, dep: Deployment) -> list[Deployment]:
    """``dep`` and the deployments linked to it by --auto-renew (predecessors and successors)."""
    chain, seen = [dep], {dep.id}
    for link, source in (("predecessor", JOB), ("successor", STATE)):
        current = dep
        while True:
            try:
                linked = (current.read(source, {}) or {}).get(link)
            except CorruptRecord:
                break
            if not linked or linked in seen:
                break
            seen.add(linked)
            current = registry.deployment(linked)
            chain.append(current)
    return chain


def cancel(key: str, home: str | None = None, timeout_s: float = 30.0) -> DeploymentStatus:
    """Cancel a deployment (and the live rest of its --auto-renew chain); wait until its job has
    left the queue."""
    registry = _registry(home)
    dep = registry.find(key)
    chain = renewal_chain(registry, dep)
    queue_watcher().watch(slurm_jobs(chain))  # one squeue call answers for the whole chain
    others = [d for d in chain[1:] if os.path.isdir(d.path) and status(d.id, home).live]
    rows = [_cancel_one(d, home, timeout_s) for d in others]
    if rows and not status(dep.id, home).live:  # it handed over: its successors were what to cancel
        return rows[-1]
    return _cancel_one(dep, home, timeout_s)


#: How often cancel reads the registry while it waits for the end (a file: no Slurm call).
_REGISTRY_POLL_S = 0.1


def stop_job(dep: Deployment) -> None:
    """Mark ``dep`` cancelled, then end its job: SIGTERM to a local one, scancel to Slurm's."""
    dep.mark_cancel()  # before the signal: the agents then know it is the user's cancel
    if dep.job.get("executor") == "local":
        try:
            os.kill(int(dep.slurm_job_id), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    else:
        scancel(dep.slurm_job_id)


def _cancel_one(dep: Deployment, home: str | None, timeout_s: float) -> DeploymentStatus:
    current = status(dep.id, home)
    if not current.live:
        raise HpcServeError(f"Deployment {dep.id} has already ended ({current.phase}, Slurm: {current.slurm_state}).",
                            "Nothing to cancel; 'hpc-serve list' shows the live ones.")
    stop_job(dep)
    _await_end(dep, dep.slurm_job_id, home, timeout_s)
    if dep.phase not in TERMINAL:  # cancelled before any node ran, or the agent was killed
        dep.set_phase("STOPPED", "cancelled" if not dep.nodes() else "cancelled; the agent did not record its end")
    return status(dep.id, home)


def _left_queue(slurm_state: str) -> bool:
    return slurm_state.split(" ", 1)[0] in _JOB_ENDED or slurm_state.startswith("n/a")


def _await_end(dep: Deployment, job_id: str, home: str | None, timeout_s: float) -> None:
    """Until the job has left the queue (Slurm asked at most once per QUEUE_POLL_S) and its agents
    have recorded their end (the registry, read every _REGISTRY_POLL_S) or had Slurm's KillWait to."""
    deadline, left_at = time.monotonic() + timeout_s, None
    while True:
        if left_at is None:
            row = status(dep.id, home)
            if _left_queue(row.slurm_state):
                left_at = time.monotonic()
            elif time.monotonic() > deadline:
                if row.slurm_state == SLURM_SILENT:
                    raise HpcServeError(f"Slurm has not answered for {timeout_s:.0f} s after scancel {job_id}: "
                                        "the job may still be in the queue.",
                                        f"Check 'squeue -j {job_id}' once Slurm answers; "
                                        f"hpc-serve status {dep.id}.")
                raise HpcServeError(f"Job {job_id} is still in the queue {timeout_s:.0f} s after scancel.",
                                    f"Check 'squeue -j {job_id}'; Slurm may be waiting for a node to respond.")
        if left_at is not None and (dep.phase in TERMINAL or not dep.nodes()
                                    or time.monotonic() - left_at > AGENT_GRACE_S):
            return
        time.sleep(_REGISTRY_POLL_S)


def cancel_all(home: str | None = None) -> list[DeploymentStatus]:
    """Cancel every live deployment."""
    registry = _registry(home)
    return [_cancel_one(registry.deployment(row.id), home, 30.0)
            for row in statuses(home) if row.live and not row.problem]
