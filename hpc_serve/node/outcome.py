"""How a run ends, recorded: a failure (FAILED, or RESTARTING while --max-restarts allows), a
follower's failure for node 0 to act on, the verdict on a signal, and the hand-over to a
successor. hpc_serve.node.ending decides why a signal came; this module records what follows.

The order is the same on every path: the end (phase and reason) is in the registry before any
Slurm call (requeue, scancel, the job's comment) and before the agent stops any engine (its
teardown comes after these return). Stdlib only.
"""

from __future__ import annotations

from ..registry import NODES, TERMINAL, Deployment
from .context import NodeRun
from .ending import Verdict
from .polling import wait_until
from .publish import withdraw_and_record

#: How long a failed follower waits for node 0 to end the run (a requeue ends it by signal).
DECISION_WAIT_S = 15
#: How long node 0 waits, after a requeue or a hand-over, for Slurm's signal that ends this run.
REQUEUE_WAIT_S, HAND_OVER_WAIT_S = 60, 30


def end_failed(run: NodeRun, reason: str) -> int:
    """Node 0: a failure ends this run. While --max-restarts allows, the job is requeued
    (RESTARTING; Slurm ends this run and starts it again under the same id); else FAILED."""
    from ..slurm import requeue

    spec, dep = run.spec, run.dep
    failures = int(dep.state.get("failures", 0)) + 1
    run.log(reason)
    if failures > spec.max_restarts or not run.job_id.isdigit():
        if spec.max_restarts:
            first, _, rest = reason.partition("\n")
            reason = f"{first} (no restart left of --max-restarts {spec.max_restarts})" + (f"\n{rest}" if rest else "")
        dep.set_phase("FAILED", reason, failures=failures)
        return 1
    withdraw_and_record(run, "RESTARTING", f"restart {failures} of {spec.max_restarts}, after: {reason}",
                        failures=failures)
    refused = requeue(run.job_id)
    if refused:
        dep.set_phase("FAILED", f"{reason}\n(could not requeue job {run.job_id} to restart it: {refused})")
        return 1
    run.log(f"requeued job {run.job_id} (restart {failures} of {spec.max_restarts})")
    run.stop.wait(REQUEUE_WAIT_S)  # Slurm ends this run now (SIGTERM) and queues the job again
    return 0


def report_failure(run: NodeRun, reason: str) -> int:
    """A follower's failure: in its record, where node 0 finds it and ends the run."""
    run.dep.write(run.dep.rank_file(NODES, run.rank), {**run.identity, "failed": reason})
    run.log(reason)
    return 1


def fail(run: NodeRun, reason: str) -> int:
    """This node failed: node 0 ends the run, a follower reports it to node 0."""
    return end_failed(run, reason) if run.is_head else report_failure(run, reason)


def failed_nodes(run: NodeRun) -> list[str]:
    """The failure reasons the followers of this run reported."""
    return [record["failed"] for record in run.records().values() if record.get("failed")]


def record_verdict(run: NodeRun, verdict: Verdict) -> None:
    """Record the end a signal brought (FAILED goes through the restart logic)."""
    if verdict.phase == "FAILED":
        end_failed(run, verdict.reason)
    elif verdict.phase == "RESTARTING":
        withdraw_and_record(run, verdict.phase, verdict.reason)
    else:
        run.dep.set_phase(verdict.phase, verdict.reason)


def hand_over(run: NodeRun, successor: Deployment) -> int:
    """The successor serves: withdraw this endpoint, record STOPPED and end this job."""
    from .renew import cancel_replaced_job

    url = successor.endpoint.get("url", "?")
    withdraw_and_record(run, "STOPPED", f"replaced by its successor {successor.id}, READY at {url}")
    run.log(f"--auto-renew: successor {successor.id} is READY at {url}; ending this job")
    if not cancel_replaced_job(run.dep, run.job_id, run.log):
        return 1
    run.stop.wait(HAND_OVER_WAIT_S)
    return 0


def await_decision(run: NodeRun) -> None:
    """A failed follower waits (bounded) for node 0 to end the run: a requeue ends it by signal."""
    wait_until(lambda: run.dep.phase in TERMINAL or run.dep.phase == "RESTARTING", DECISION_WAIT_S,
               stop=run.stop)
