"""The node agent: `python -m hpc_serve.node ...`, one task per node inside the allocation.

Stdlib only. Each node records who it is (hostname, IP, Slurm node id, GPUs) in the registry;
rank 0 also writes the deployment's spec, plan and state, waits until every node has reported
(naming the ones that did not), and holds the allocation until it is cancelled or reaches its
time limit. Starting Ray and vLLM comes with the engine release; until then rank 0 says so in the
phase reason.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from .errors import HpcServeError
from .launch import make_plan
from .node_args import parse_node_args
from .registry import Deployment, Registry, create_json, registry_root
from .spec import DeploymentSpec, build_spec

JOIN_TIMEOUT_S = float(os.environ.get("HPC_SERVE_JOIN_TIMEOUT", "120"))
_END_SIGNALS = {signal.SIGTERM: "STOPPED", signal.SIGINT: "STOPPED",
                signal.SIGUSR1: "TIMEOUT", signal.SIGUSR2: "TIMEOUT"}


class NodeLog:
    """Timestamped lines to stdout (Slurm's output file) and to the registry's node log."""

    def __init__(self, path: str, rank: int) -> None:
        self.path, self.rank = path, rank

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} node {self.rank}: {message}"
        print(line, flush=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def node_identity(rank: int) -> dict[str, Any]:
    """What this node is, as Slurm and the network see it."""
    hostname = socket.gethostname()
    try:
        ip = socket.gethostbyname(hostname)
    except OSError:
        ip = "127.0.0.1"
    env = os.environ
    return {
        "rank": rank, "hostname": hostname, "ip": ip, "pid": os.getpid(), "started": time.time(),
        "slurm_node_id": env.get("SLURM_NODEID"), "slurmd_nodename": env.get("SLURMD_NODENAME"),
        "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
        "slurm_gpus_on_node": env.get("SLURM_GPUS_ON_NODE"),
    }


def _wait_for_nodes(dep: Deployment, count: int, log: NodeLog, stop: threading.Event) -> list[int]:
    """Poll until ``count`` nodes have reported; return the missing ranks (empty on success)."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    reported = 0
    while not stop.is_set():
        ranks = set(dep.nodes())
        if len(ranks) != reported:
            reported = len(ranks)
            dep.set_phase("STARTING", f"{reported}/{count} nodes reported")
            log(f"{reported}/{count} nodes reported")
        if reported >= count:
            return []
        if time.monotonic() > deadline:
            return sorted(set(range(count)) - ranks)
        stop.wait(0.2)
    return []


def run(spec: DeploymentSpec, rank: int, job_id: str, executor: str) -> int:
    """Everything one node does for deployment ``job_id``; returns the exit code."""
    dep = Registry(registry_root(spec.home)).deployment(job_id).ensure()
    log = NodeLog(dep.log_path(rank), rank)
    ended: dict[str, str] = {}
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        ended.setdefault("phase", _END_SIGNALS[signum])
        ended.setdefault("signal", signal.Signals(signum).name)
        stop.set()

    for signum in _END_SIGNALS:
        signal.signal(signum, on_signal)

    identity = node_identity(rank)
    dep.write(f"nodes/{rank}.json", identity)
    log(f"reported: {identity['hostname']} {identity['ip']} GPUs={identity['cuda_visible_devices']}")
    if rank == 0:
        launch = make_plan(spec)
        create_json(dep.file("spec.json"), spec.to_dict())
        create_json(dep.file("plan.json"), launch.to_dict())
        create_json(dep.file("job.json"), {"job_id": job_id, "executor": executor,
                                           "name": os.environ.get("SLURM_JOB_NAME", spec.name),
                                           "submitted": time.time()})
        missing = _wait_for_nodes(dep, spec.layout.nodes, log, stop)
        if missing:
            reason = f"nodes {missing} never reported within {JOIN_TIMEOUT_S:.0f} s"
            dep.set_phase("FAILED", reason)
            log(reason)
            return 1
        if not stop.is_set():
            dep.set_phase("STARTING", f"all {spec.layout.nodes} nodes reported (engine: not built "
                          "in this version; holding the allocation)")
    while not stop.is_set():
        stop.wait(1.0)
    log(f"received {ended.get('signal', 'stop')}: ending")
    if rank == 0:
        dep.set_phase(ended.get("phase", "STOPPED"), f"received {ended.get('signal', 'stop')}")
    return 0


def _rank_and_job() -> tuple[int, str, str]:
    env = os.environ
    if "SLURM_JOB_ID" in env:
        return int(env.get("SLURM_NODEID", "0")), env["SLURM_JOB_ID"], "sbatch"
    return 0, f"local-{os.getpid()}", "local"


def run_task(model: str, node_args: list[str], home: str) -> int:
    """The function submitit runs on every task (one per node)."""
    import submitit

    job_env = submitit.JobEnvironment()
    spec = build_spec(**{**parse_node_args(["--model", model, *node_args]), "home": home,
                         "executor": "local"})
    executor = "local" if job_env.cluster == "local" else "slurm"
    job_id = str(job_env.job_id) if executor == "slurm" else f"local-{job_env.job_id}"
    return run(spec, job_env.global_rank, job_id, executor)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m hpc_serve.node` (the sbatch templates' srun line)."""
    try:
        values = parse_node_args(sys.argv[1:] if argv is None else argv)
        spec = build_spec(executor="local", **values)
        rank, job_id, executor = _rank_and_job()
        return run(spec, rank, job_id, executor)
    except HpcServeError as exc:
        print(f"hpc-serve node: {exc.problem}", file=sys.stderr)
        if exc.hint:
            print(exc.hint, file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
