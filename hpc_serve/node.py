"""The node agent: `python -m hpc_serve.node ...`, one task per node inside the allocation.

Stdlib only. Each node records who it is (hostname, IP, Slurm node id, GPUs) in the registry;
rank 0 also writes the deployment's spec, plan and state and waits until every node has
reported (naming the ones that did not). With the mp launcher every node then runs its vLLM
process; rank 0 marks LOADING, then READY once /health answers and /v1/models lists the model,
publishes the endpoint, and turns any node's vLLM exit into FAILED with its last lines. Cancel and
the time-limit signal stop vLLM and record STOPPED or TIMEOUT. The Ray launcher's engine is not
built yet: its agents hold the allocation and say so.
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
        create_json(dep.file("spec.json"), spec.to_dict())
        create_json(dep.file("plan.json"), make_plan(spec).to_dict())
        create_json(dep.file("job.json"), {"job_id": job_id, "executor": executor,
                                           "name": os.environ.get("SLURM_JOB_NAME", spec.name),
                                           "submitted": time.time()})
        missing = _wait_for_nodes(dep, spec.layout.nodes, log, stop)
        if missing:
            return _fail(dep, log, f"nodes {missing} never reported within {JOIN_TIMEOUT_S:.0f} s")
    code = 0
    if spec.layout.launcher == "mp" and not stop.is_set():
        code = _serve_mp(spec, dep, rank, job_id, identity, log, stop)
    elif rank == 0 and not stop.is_set():
        dep.set_phase("STARTING", f"all {spec.layout.nodes} nodes reported (the Ray launcher's "
                      "engine is not built in this version; holding the allocation)")
    while code == 0 and not stop.is_set():
        stop.wait(1.0)
    if stop.is_set():
        log(f"received {ended.get('signal', 'stop')}: ending")
    if rank == 0 and dep.phase != "FAILED":
        failed = _failed_nodes(dep)
        if failed:
            dep.set_phase("FAILED", failed[0])
        elif stop.is_set():
            dep.set_phase(ended.get("phase", "STOPPED"), f"received {ended.get('signal', 'stop')}")
    return code


def _fail(dep: Deployment, log: NodeLog, reason: str) -> int:
    dep.set_phase("FAILED", reason)
    log(reason)
    return 1


def _failed_nodes(dep: Deployment) -> list[str]:
    return [record["failed"] for record in dep.nodes().values() if record.get("failed")]


def _serve_mp(spec: DeploymentSpec, dep: Deployment, rank: int, job_id: str, identity: dict,
              log: NodeLog, stop: threading.Event) -> int:
    """vLLM's native multi-node launcher: every node runs its own vllm process."""
    from .engine import EngineProcess, busy_ports, make_runtime, serves, tail, wait_until
    from .launch import node_plan
    from .vllm_args import served_model_name

    head = identity if rank == 0 else None
    if head is None:
        wait_until(lambda: 0 in dep.nodes(), JOIN_TIMEOUT_S, stop=stop)
        head = dep.nodes().get(0)
        if head is None:
            log("node 0 never reported; ending")
            return 1
    rt = make_runtime(job_id, identity["ip"], head["ip"], spec.port)
    plan = node_plan(spec, rank, rt)
    where = f"node {rank} ({identity['hostname']})"

    def fail(reason: str) -> int:
        if rank == 0:
            return _fail(dep, log, reason)
        dep.write(f"nodes/{rank}.json", {**identity, "failed": reason})
        log(reason)
        return 1

    if rank == 0:
        wanted = [int(rt.api_port)] + ([int(rt.master_port)] if spec.layout.nodes > 1 else [])
        busy = busy_ports(rt.node_ip, wanted)
        if busy:
            return fail(f"port(s) {busy} already in use on {where}: pass a free --port, or resubmit")
    engine = EngineProcess(plan.processes[-1], dep.log_path(rank), rt.tmp_dir)
    try:
        engine.start()
    except RuntimeError as exc:
        return fail(f"{where}: {exc}")
    log(f"started vLLM (pid {engine.popen.pid}): {' '.join(plan.processes[-1].argv)}")
    url, model = f"http://{rt.node_ip}:{rt.api_port}", served_model_name(spec.model, spec.vllm_args)
    if rank == 0:
        dep.set_phase("LOADING", f"vLLM starting on {spec.layout.nodes} node(s)")
    ready = False
    try:
        while not stop.is_set():
            if engine.exit_code is not None:
                return fail(f"vLLM on {where} exited with code {engine.exit_code}; its last lines:\n"
                            f"{tail(dep.log_path(rank))}")
            if rank == 0:
                failed = _failed_nodes(dep)
                if failed:
                    return _fail(dep, log, failed[0])
                if not ready and serves(url, model):
                    ready = True
                    dep.write("endpoint.json", {"url": f"{url}/v1", "base": url, "host": rt.node_ip,
                                                "hostname": identity["hostname"], "port": int(rt.api_port),
                                                "model": spec.model, "served_model": model})
                    dep.set_phase("READY", f"{url}/v1")
                    log(f"READY at {url}/v1 (model {model})")
            stop.wait(1.0 if ready else 0.1)
    finally:
        engine.stop()
        log("vLLM stopped; its temp files removed")
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
        exc.report("hpc-serve node")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
