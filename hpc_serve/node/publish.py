"""Node 0's endpoint, where clients find it: ``endpoint.json`` in the registry (URL, host,
port, model, key file) and the URL in the job's Slurm comment (``squeue -o %k`` shows it).

Publishing marks READY; withdrawing (a restart, a requeue, a hand-over) removes the record
first, then records the phase, and only then asks Slurm to clear the comment: an end is in the
registry before any Slurm call. A replica of a group (hpc_serve.fleet) then waits, bounded, until
the group's router has let it go and its last requests are done, before anything can stop it.
Stdlib only.
"""

from __future__ import annotations

import re
import urllib.request
from typing import Any, Callable

from ..registry import API_KEY, ENDPOINT, MEMBERS, TERMINAL, CorruptRecord, Registry
from .context import NodeRun
from .polling import wait_until

#: How long a replica waits for its router to take it out, then for its requests in flight.
LEAVE_WAIT_S, DRAIN_WAIT_S = 5.0, 30.0
_IN_FLIGHT = re.compile(r"^vllm:num_requests_(?:running|waiting)(?:\{[^}]*\})?\s+([0-9.e+]+)\s*$", re.M)


def publish_endpoint(run: NodeRun) -> None:
    """Node 0, once vLLM serves: the endpoint record, READY, and the job's comment."""
    rt, url = run.runtime, run.url
    assert rt is not None
    run.dep.write(ENDPOINT, {"url": f"{url}/v1", "base": url, "host": rt.node_ip,
                             "hostname": run.identity["hostname"], "port": int(rt.api_port),
                             "model": run.spec.model, "served_model": run.served_model,
                             "api_key_file": run.dep.file(API_KEY) if run.api_key else None})
    run.dep.set_phase("READY", f"{url}/v1")
    run.log(f"READY at {url}/v1 (model {run.served_model})")
    set_job_comment(run.job_id, f"{url}/v1", run.log)


def withdraw_and_record(run: NodeRun, phase: str, reason: str, **extra: Any) -> None:
    """Record ``phase``: the endpoint of this or an earlier run is gone, nobody should be sent
    there. Its record goes first, then the phase; the job's comment (a Slurm call) last."""
    base = run.dep.endpoint.get("base")
    if base:
        run.dep.remove(ENDPOINT)
    run.dep.set_phase(phase, reason, **extra)
    if base:
        try:
            leave_router(run, base)
        except Exception as exc:  # noqa: BLE001 - leaving is best effort; the end must be recorded
            run.log(f"could not wait to leave the router: {exc!r}")
        set_job_comment(run.job_id, "", run.log)


def _in_router(router, base: str) -> bool:
    try:
        members = (router.read(MEMBERS, {}) or {}).get("members", [])
        return router.phase not in TERMINAL and any(member.get("url") == base for member in members)
    except CorruptRecord:
        return True


def _in_flight(run: NodeRun, base: str) -> int:
    """Requests vLLM is running or holding now (0 when it does not answer)."""
    try:
        request = urllib.request.Request(f"{base}/metrics", headers=run.auth_headers)
        with urllib.request.urlopen(request, timeout=2.0) as response:
            text = response.read().decode(errors="replace")
    except (OSError, ValueError):
        return 0
    return int(sum(float(value) for value in _IN_FLIGHT.findall(text)))


def leave_router(run: NodeRun, base: str) -> None:
    """A group's replica: wait until its router no longer sends it requests, then until those it
    has are answered (both bounded); a plain deployment returns at once."""
    router_id = run.dep.job.get("router")
    if not router_id:
        return
    router = Registry(run.dep.root).deployment(router_id)
    if not wait_until(lambda: not _in_router(router, base), LEAVE_WAIT_S, poll_s=0.05):
        run.log(f"the router {router_id} still lists this replica after {LEAVE_WAIT_S:.0f} s; going on")
        return
    drained = wait_until(lambda: _in_flight(run, base) == 0, DRAIN_WAIT_S, poll_s=0.1)
    run.log(f"left the router {router_id}" + ("" if drained else
                                               f"; requests still running after {DRAIN_WAIT_S:.0f} s"))


def set_job_comment(job_id: str, text: str, log: Callable[[str], None]) -> None:
    """Put ``text`` (the endpoint's URL, or nothing) in the job's comment; a refusal is logged."""
    from ..slurm import SlurmError, set_comment

    try:
        set_comment(job_id, text)
    except SlurmError as exc:
        log(f"could not set the job comment: {exc.reason}")
