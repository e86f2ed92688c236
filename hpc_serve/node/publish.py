"""Node 0's endpoint, where clients find it: ``endpoint.json`` in the registry (URL, host,
port, model, key file) and the URL in the job's Slurm comment (``squeue -o %k`` shows it).

Publishing marks READY; withdrawing (a restart, a requeue, a hand-over) removes the record
first, then records the phase, and only then asks Slurm to clear the comment: an end is in the
registry before any Slurm call. Stdlib only.
"""

from __future__ import annotations

from typing import Any, Callable

from ..registry import API_KEY, ENDPOINT
from .context import NodeRun


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
    had_endpoint = bool(run.dep.endpoint)
    if had_endpoint:
        run.dep.remove(ENDPOINT)
    run.dep.set_phase(phase, reason, **extra)
    if had_endpoint:
        set_job_comment(run.job_id, "", run.log)


def set_job_comment(job_id: str, text: str, log: Callable[[str], None]) -> None:
    """Put ``text`` (the endpoint's URL, or nothing) in the job's comment; a refusal is logged."""
    from ..slurm import SlurmError, set_comment

    try:
        set_comment(job_id, text)
    except SlurmError as exc:
        log(f"could not set the job comment: {exc.reason}")
