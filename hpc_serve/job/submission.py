"""Submitting a deployment through submitit: Slurm, or this machine with `--executor local`.

The job runs the same node agent as the sbatch templates (`hpc_serve.node.agent.run_task` calls
`hpc_serve.node.agent.run`), with the same setup lines (rendered from templates/partials/setup.j2).
Nothing is recorded in the registry unless Slurm accepted the job.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import time

from ..errors import HpcServeError
from ..planner.launch import make_plan
from ..node.args import to_node_args
from ..registry import JOB, NODES, PLAN, SPEC, Deployment, Registry, registry_root
from ..slurm import which
from ..planner.spec import DeploymentSpec
from .request import router_request, slurm_request

def _setup_lines(spec: DeploymentSpec, root: str) -> list[str]:
    from .sbatch import render_template

    text = render_template("partials/setup.j2", spec=spec)
    return [f"export HPC_SERVE_HOME={shlex.quote(root)}", *text.splitlines()]


def _sbatch_reason(message: str) -> str:
    """The line of sbatch's stderr that says why it refused the job."""
    lines = [line.strip() for line in message.splitlines() if "error" in line.lower()]
    for line in lines:
        if "Batch job submission failed" in line:
            return re.sub(r"^sbatch: error: ", "", line)
    return lines[-1] if lines else message.strip().splitlines()[-1] if message.strip() else "unknown error"


def local_gpus(needed: int, environ: dict[str, str] | None = None) -> list[str]:
    """The devices a ``--executor local`` job gets: the first ``needed`` of CUDA_VISIBLE_DEVICES
    as the user set it, else of this machine's NVIDIA GPUs; where no NVIDIA driver is seen (a CPU
    build of vLLM), the numbers 0..needed-1. HpcServeError when there are fewer than needed."""
    environ = os.environ if environ is None else environ
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        devices, source = [d.strip() for d in given.split(",") if d.strip()], f"CUDA_VISIBLE_DEVICES={given!r}"
    elif os.path.isdir("/proc/driver/nvidia/gpus"):
        devices = [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
        source = f"this machine's {len(devices)} GPU(s)"
    else:
        return [str(i) for i in range(needed)]
    if len(devices) < needed:
        raise HpcServeError(f"The layout needs {needed} GPU(s) on this machine, but {source} gives {len(devices)}.",
                            "Ask for fewer (--nodes, --gpus-per-node), or make more visible.")
    return devices[:needed]


def _executor(spec: DeploymentSpec, root: str, hold: bool = False):
    import submitit

    folder = os.path.join(root, "submitit", "%j")
    if spec.executor == "local" and (spec.max_restarts or spec.auto_renew):
        option = "--max-restarts" if spec.max_restarts else "--auto-renew"
        raise HpcServeError(f"{option} needs Slurm: it requeues or resubmits the job.",
                            f"Leave {option} out with --executor local.")
    if spec.executor == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(tasks_per_node=spec.layout.nodes, nodes=1,
                                   timeout_min=spec.time_minutes or 60 * 24 * 365)
        return executor
    return _slurm_executor(spec, root, slurm_request(spec, hold),
                           "Run on a login node, or use --executor local to serve on this machine.")


def _slurm_executor(spec: DeploymentSpec, root: str, request, hint: str):
    """submitit's SlurmExecutor for ``request``, the job's setup lines from ``spec``."""
    import submitit

    if which("sbatch") is None:
        raise HpcServeError("sbatch is not on PATH: this machine is not a Slurm login node.", hint)
    executor = submitit.SlurmExecutor(folder=os.path.join(root, "submitit", "%j"))
    executor.update_parameters(**{**request.submitit_parameters(), "setup": _setup_lines(spec, root)})
    return executor


@contextlib.contextmanager
def _detached_output(active: bool):
    """Point fds 1 and 2 at /dev/null while a local job starts, so it does not hold our terminal."""
    if not active:
        yield
        return
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _submitted(executor, local: bool, task, *args):
    """submitit's job for ``task(*args)``; HpcServeError with sbatch's reason when Slurm refuses."""
    try:
        # submitit echoes sbatch's stderr on failure; the reason is reported once, below.
        with contextlib.redirect_stderr(io.StringIO()), _detached_output(local):
            return executor.submit(task, *args)
    except Exception as exc:  # submitit wraps sbatch's refusal in its own error types
        if type(exc).__name__ not in ("FailedJobError", "CalledProcessError", "FileNotFoundError"):
            raise
        raise HpcServeError(f"Slurm refused the job: {_sbatch_reason(str(exc))}",
                            "Check --partition, --nodes and --gpus-per-node against 'sinfo'.") from None


def submit_router(spec: DeploymentSpec, partition: str | None, time_minutes: int | None) -> str:
    """Submit a group's router job (hpc_serve.fleet.keeper), held; return its job id."""
    from ..fleet.keeper import run_task as run_router

    root = registry_root(spec.home)
    executor = _slurm_executor(spec, root, router_request(spec, partition, time_minutes),
                               "Run on a login node, or keep the router on this machine: --router local.")
    return str(_submitted(executor, False, run_router, root).job_id)


def submit(spec: DeploymentSpec, hold: bool = False) -> Deployment:
    """Submit ``spec``; return its registry entry (state PENDING until a node reports). ``hold``:
    the job waits for ``slurm.release`` (its entry can be completed before it starts)."""
    registry = Registry(registry_root(spec.home))
    registry.check_writable()
    executor = _executor(spec, registry.root, hold)
    lay = spec.layout
    gpus = ",".join(local_gpus(lay.nodes * lay.gpus_per_node)) if spec.executor == "local" else None
    from ..node.agent import run_task

    asked_at = time.time()
    job = _submitted(executor, spec.executor == "local", run_task, spec.model, to_node_args(spec), registry.root, gpus)
    job_id = str(job.job_id) if spec.executor == "slurm" else f"local-{job.job_id}"
    dep = registry.deployment(job_id)
    if os.path.isdir(dep.path) and (dep.read(dep.rank_file(NODES, 0), {}) or {}).get("started", 0) < asked_at:
        # A folder for a job id Slurm just handed out, with no agent of this job in it, is left
        # from an earlier life of the cluster (job ids restart): keep it, but out of the way.
        os.rename(dep.path, os.path.join(registry.root, "deployments", f".stale-{job_id}-{int(time.time())}"))
    dep.ensure()
    dep.write(SPEC, spec.to_dict())
    dep.write(PLAN, make_plan(spec).to_dict())
    dep.write(JOB, {"job_id": job_id, "slurm_job_id": str(job.job_id), "executor": spec.executor,
                           "name": spec.name, "submitted": time.time(),
                           "submitit_folder": os.path.join(registry.root, "submitit", str(job.job_id))})
    dep.init_phase("PENDING", "submitted")
    return dep
