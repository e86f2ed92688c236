"""The node agent: `python -m hpc_serve.node ...`, one task per node inside the allocation.

Stdlib only. Each node records who it is (hostname, IP, Slurm node id, GPUs) in the registry;
rank 0 also writes the deployment's spec, plan and state and waits until every node has
reported (naming the ones that did not). With the mp launcher every node then runs its vLLM
process; rank 0 marks LOADING, then READY once /health answers and /v1/models lists the model,
publishes the endpoint, and turns any node's vLLM exit into FAILED with its last lines. With the
Ray launcher rank 0 writes the Ray token, starts the Ray head, and waits until every node and
GPU joined (naming the ones that did not); the workers start as soon as the token exists.
Cancel and the time-limit signal stop vLLM (then Ray) and record STOPPED or TIMEOUT.

Restarts: a requeued job runs again under the same id with SLURM_RESTART_COUNT set; every record of
a run carries that count, so nothing of an earlier run is mistaken for this one. Rank 0 requeues a
failed deployment itself while `--max-restarts` allows (RESTARTING). When a signal ends the run,
`hpc_serve.node.ending` decides why (cancel, time limit, requeue, or another node's agent vanishing)
at once, while the engines stop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from .ending import judge, note_signal
from ..errors import HpcServeError
from .heartbeat import Heartbeat
from ..planner.launch import make_plan
from .args import node_spec
from ..registry import TERMINAL, Deployment, Registry, create_json, registry_root
from ..planner.spec import DeploymentSpec

JOIN_TIMEOUT_S = float(os.environ.get("HPC_SERVE_JOIN_TIMEOUT", "120"))
#: The signals that end a run (USR1 and USR2: the time limit is near; see hpc_serve.node.ending).
_END_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class DeploymentFailed(RuntimeError):
    """Raised by the submitit task so that the task exits non-zero and Slurm ends the job."""


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


def node_identity(rank: int, ip: str) -> dict[str, Any]:
    """What this node is, as Slurm and the network see it (``ip``: the address it serves on)."""
    env = os.environ
    return {
        "rank": rank, "hostname": socket.gethostname(), "ip": ip, "pid": os.getpid(),
        "started": time.time(), "slurm_node_id": env.get("SLURM_NODEID"),
        "slurmd_nodename": env.get("SLURMD_NODENAME"),
        "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
        "slurm_gpus_on_node": env.get("SLURM_GPUS_ON_NODE"),
    }


def _node_address(spec: DeploymentSpec, dep: Deployment, rank: int, restart: int, multi_host: bool,
                  stop: threading.Event) -> tuple[str, str]:
    """(this node's address, how it was chosen). A follower first waits for node 0's record: its
    default is the address its route to node 0 leaves from. With a named network, Gloo and NCCL
    are pointed at the same interface unless the user chose one. Raises HpcServeError."""
    from .engine import wait_until
    from .netaddr import choose_address

    head_ip = None
    if rank > 0 and spec.network is None:
        wait_until(lambda: 0 in dep.nodes(restart), JOIN_TIMEOUT_S, stop=stop)
        head_ip = dep.nodes(restart).get(0, {}).get("ip")
    chosen = choose_address(spec.network, head_ip)
    if multi_host and chosen.ip.startswith("127."):
        raise HpcServeError(f"{socket.gethostname()} has only a loopback address ({chosen.ip}), which "
                            "the other nodes cannot reach.",
                            "Name the network the nodes share: --network IFACE (e.g. ib0) or a CIDR.")
    if spec.network and chosen.interface:
        user_env = dict(spec.env)
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if name not in os.environ and name not in user_env:
                os.environ[name] = chosen.interface
    return chosen.ip, chosen.how


def _wait_for_nodes(dep: Deployment, count: int, restart: int, log: NodeLog,
                    stop: threading.Event) -> list[int]:
    """Poll until ``count`` nodes of this run have reported; return the missing ranks (empty on success)."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    reported = 0
    while not stop.is_set():
        ranks = set(dep.nodes(restart))
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
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    started = time.time()
    ended: dict[str, str] = {}
    stop = threading.Event()
    judging: list[threading.Thread] = []

    def end_failed(reason: str) -> int:
        return _end_failed(spec, dep, job_id, reason, log, stop)

    def record_end(signame: str) -> None:
        verdict = judge(dep, job_id, rank, restart, signame, started)
        if verdict is None:
            return
        if verdict.phase == "FAILED":
            end_failed(verdict.reason)
        else:
            if verdict.phase == "RESTARTING":
                _withdraw_endpoint(dep, job_id, log)
            dep.set_phase(verdict.phase, verdict.reason)

    def on_signal(signum: int, _frame: Any) -> None:
        if "signal" in ended:
            return
        ended["signal"] = signal.Signals(signum).name
        stop.set()
        note_signal(dep, rank, restart, ended["signal"])
        judging.append(threading.Thread(target=record_end, args=(ended["signal"],), name="end"))
        judging[0].start()  # decided while the engines stop, before any of them is gone

    for signum in _END_SIGNALS:
        signal.signal(signum, on_signal)

    _mark(dep, rank, "agent_start", at=started, fresh=True)
    if rank == 0 and os.environ.get("HPC_SERVE_JOB_START"):
        _mark(dep, rank, "job_start", at=float(os.environ["HPC_SERVE_JOB_START"]))
    if rank == 0 and restart:  # before node 0's record: the others trust the phase once it is there
        _withdraw_endpoint(dep, job_id, log)
        dep.set_phase("STARTING", f"restart {restart}: the job runs again on {socket.gethostname()}",
                      restart=restart)
    try:
        ip, how = _node_address(spec, dep, rank, restart, spec.layout.nodes > 1 and executor != "local", stop)
    except HpcServeError as exc:
        ip, how = "", ""
        problem = f"node {rank} ({socket.gethostname()}): {exc.problem} {exc.hint}"
    else:
        problem = ""
    identity = {**node_identity(rank, ip), "restart": restart}
    dep.write(f"nodes/{rank}.json", identity)
    _sweep_leftovers(job_id, log)
    log(f"reported: {identity['hostname']} {ip} ({how}) GPUs={identity['cuda_visible_devices']}"
        + (f" (restart {restart})" if restart else ""))
    if rank == 0:
        create_json(dep.file("spec.json"), spec.to_dict())
        create_json(dep.file("plan.json"), make_plan(spec).to_dict())
        create_json(dep.file("job.json"), {"job_id": job_id, "executor": executor,
                                           "name": os.environ.get("SLURM_JOB_NAME", spec.name),
                                           "submitted": time.time()})
    if problem:
        code = end_failed(problem) if rank == 0 else _report_failure(dep, rank, identity, problem, log)
    elif rank == 0 and (missing := _wait_for_nodes(dep, spec.layout.nodes, restart, log, stop)):
        code = end_failed(f"nodes {missing} never reported within {JOIN_TIMEOUT_S:.0f} s")
    else:
        code = 0 if stop.is_set() else _serve(spec, dep, rank, job_id, identity, log, stop, end_failed,
                                              Heartbeat(dep, rank, stop).start())
    if rank > 0 and code and not stop.is_set():
        _await_decision(dep, stop)
    if stop.is_set():
        log(f"received {ended.get('signal', 'stop')}: ending")
    for thread in judging:
        thread.join(15)
    if rank == 0 and not stop.is_set() and dep.phase not in (*TERMINAL, "RESTARTING"):
        failed = _failed_nodes(dep, restart)
        if failed:
            code = end_failed(failed[0])
    return code


def _report_failure(dep: Deployment, rank: int, identity: dict, reason: str, log: NodeLog) -> int:
    """A follower's failure: in its record, where node 0 finds it and ends the run."""
    dep.write(f"nodes/{rank}.json", {**identity, "failed": reason})
    log(reason)
    return 1


def _end_failed(spec: DeploymentSpec, dep: Deployment, job_id: str, reason: str, log: NodeLog,
                stop: threading.Event) -> int:
    """Rank 0: a failure ends this run. While --max-restarts allows, the job is requeued
    (RESTARTING; Slurm ends this run and starts it again under the same id); else FAILED."""
    from ..slurm import requeue

    failures = int(dep.state.get("failures", 0)) + 1
    log(reason)
    if failures > spec.max_restarts or not job_id.isdigit():
        if spec.max_restarts:
            first, _, rest = reason.partition("\n")
            reason = f"{first} (no restart left of --max-restarts {spec.max_restarts})" + (f"\n{rest}" if rest else "")
        dep.set_phase("FAILED", reason, failures=failures)
        return 1
    _withdraw_endpoint(dep, job_id, log)
    dep.set_phase("RESTARTING", f"restart {failures} of {spec.max_restarts}, after: {reason}",
                  failures=failures)
    refused = requeue(job_id)
    if refused:
        dep.set_phase("FAILED", f"{reason}\n(could not requeue job {job_id} to restart it: {refused})")
        return 1
    log(f"requeued job {job_id} (restart {failures} of {spec.max_restarts})")
    stop.wait(60)  # Slurm ends this run now (SIGTERM) and queues the job again
    return 0


def _hand_over(dep: Deployment, job_id: str, successor: Deployment, log: NodeLog,
               stop: threading.Event) -> int:
    """The successor serves: withdraw this endpoint, record STOPPED and end this job."""
    from ..slurm import scancel

    url = successor.endpoint.get("url", "?")
    _withdraw_endpoint(dep, job_id, log)
    dep.set_phase("STOPPED", f"replaced by its successor {successor.id}, READY at {url}")
    log(f"--auto-renew: successor {successor.id} is READY at {url}; ending this job")
    try:
        scancel(job_id)
    except HpcServeError as exc:
        log(f"could not cancel job {job_id}: {exc.problem}")
        return 1
    stop.wait(30)
    return 0


def _await_decision(dep: Deployment, stop: threading.Event) -> None:
    """A failed follower waits (bounded) for node 0 to end the run: a requeue ends it by signal."""
    from .engine import wait_until

    wait_until(lambda: dep.phase in TERMINAL or dep.phase == "RESTARTING", 15, stop=stop)


def _withdraw_endpoint(dep: Deployment, job_id: str, log: NodeLog) -> None:
    """The endpoint of an earlier run is gone: nobody should be sent there."""
    if dep.endpoint:
        dep.remove("endpoint.json")
        _publish_comment(job_id, "", log)


def _failed_nodes(dep: Deployment, restart: int) -> list[str]:
    return [record["failed"] for record in dep.nodes(restart).values() if record.get("failed")]


def _head_identity(dep: Deployment, rank: int, identity: dict, stop: threading.Event) -> dict | None:
    from .engine import wait_until

    if rank == 0:
        return identity
    restart = identity["restart"]
    wait_until(lambda: 0 in dep.nodes(restart), JOIN_TIMEOUT_S, stop=stop)
    return dep.nodes(restart).get(0)


def _gres_mismatch(spec: DeploymentSpec, identity: dict) -> str | None:
    """Slurm's GPU count on this node, when it has one, must be what the layout plans."""
    given = identity.get("slurm_gpus_on_node") or ""
    if given.isdigit() and int(given) != spec.layout.gpus_per_node:
        return (f"Slurm gave {identity['hostname']} {given} GPU(s) (CUDA_VISIBLE_DEVICES="
                f"{identity.get('cuda_visible_devices')}) but the layout needs "
                f"{spec.layout.gpus_per_node} per node: resubmit with --gpus-per-node {given}")
    return None


def _serve(spec: DeploymentSpec, dep: Deployment, rank: int, job_id: str, identity: dict,
           log: NodeLog, stop: threading.Event, end_failed, beats: Heartbeat) -> int:
    """Start this node's planned processes (Ray, then vLLM), then watch them until the end."""
    from .engine import (EngineProcess, busy_ports, clean_node, exit_reason, make_runtime, private_dir,
                         serves, shm_files, unguarded)
    from ..planner.launch import Process, node_plan
    from ..planner.vllm_args import served_model_name

    where = f"node {rank} ({identity['hostname']})"

    def fail(reason: str) -> int:
        return end_failed(reason) if rank == 0 else _report_failure(dep, rank, identity, reason, log)

    mismatch = _gres_mismatch(spec, identity)
    if mismatch:
        return fail(mismatch)
    head = _head_identity(dep, rank, identity, stop)
    if head is None:
        log("node 0 never reported; ending")
        return 1
    rt = make_runtime(job_id, identity["ip"], head["ip"], spec.port)
    plan = node_plan(spec, rank, rt)
    try:
        private_dir(rt.tmp_dir)
    except (RuntimeError, OSError) as exc:
        return fail(f"{where}: {exc}")
    lay = spec.layout
    extra_env: tuple[tuple[str, str], ...] = ()
    if lay.launcher == "ray":
        from .ray_cluster import ray_env

        extra_env = ray_env(dep.file("ray_token"), JOIN_TIMEOUT_S)
        if rank == 0:
            dep.create_secret("ray_token")
    api_key = dep.create_secret("api_key") if spec.api_key and rank == 0 else ""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    busy = busy_ports(rt.node_ip, [int(port) for port in plan.ports])  # exactly what this node binds
    if busy:
        return fail(f"port(s) {busy} already in use on {where}: pass a free --port, or resubmit")
    url, model = f"http://{rt.node_ip}:{rt.api_port}", served_model_name(spec.model, spec.vllm_args)
    shm_before, marker = shm_files(), f"{job_id}/{rank}"
    engines: list[EngineProcess] = []
    ready = False
    renewal = None
    if rank == 0 and spec.auto_renew and job_id.isdigit():
        from .renew import Renewal

        renewal = Renewal(dep, job_id, spec.renew_before, log)
    try:
        for planned in plan.processes:
            if planned.name == "ray" and rank > 0 and not _wait_for_ray_token(dep, stop):
                return 0 if stop.is_set() or dep.phase in TERMINAL else \
                    fail(f"{where}: node 0 never started Ray within {JOIN_TIMEOUT_S:.0f} s")
            env = planned.env + extra_env
            if planned.name == "vllm" and api_key:  # the key: its environment, never its argv
                env += _auth_env(spec, api_key, rt.tmp_dir)
            process = Process(planned.name, planned.argv, env)
            engine = EngineProcess(process, dep.log_path(rank), rt.tmp_dir, marker)
            try:
                engine.start(spec.cache_dir)
            except RuntimeError as exc:
                return fail(f"{where}: {exc}")
            engines.append(engine)
            log(f"started {planned.name} (pid {engine.popen.pid}): {' '.join(planned.argv)}")
            _mark(dep, rank, f"{planned.name}_started")
            if planned.name == "ray" and rank == 0:
                reason = _form_ray(spec, dep, rt, engine, log, stop)
                if reason:
                    return fail(reason)
        if rank == 0 and not stop.is_set():
            dep.set_phase("LOADING", f"vLLM starting on {lay.nodes} node(s)")
        while not stop.is_set():
            for engine in engines:
                if engine.exit_code is not None and not stop.is_set():  # not a signalled end
                    return fail(exit_reason(engine.process.name, where, engine.exit_code,
                                            dep.log_path(rank)))
            quiet = beats.silent(range(1, lay.nodes) if rank == 0 else [0])
            if quiet:
                records = dep.nodes(identity["restart"])
                reason = beats.reason(quiet[0], records.get(quiet[0], {}).get("hostname", "?"))
                if rank > 0:  # node 0 cannot record its own end any more: this node does
                    dep.set_phase("FAILED", reason)
                return fail(reason)
            if rank == 0:
                failed = _failed_nodes(dep, identity["restart"])
                if failed:
                    return end_failed(failed[0])
                if not ready and serves(url, model, headers):
                    open_door = unguarded(url, spec.open_metrics) if api_key else None
                    if open_door:
                        return fail(f"vLLM on {where} answers without the key ({open_door}): the "
                                    "hpc_serve_auth middleware did not load; the endpoint is not published")
                    ready = True
                    _mark(dep, rank, "ready")
                    dep.write("endpoint.json", {"url": f"{url}/v1", "base": url, "host": rt.node_ip,
                                                "hostname": identity["hostname"], "port": int(rt.api_port),
                                                "model": spec.model, "served_model": model,
                                                "api_key_file": dep.file("api_key") if api_key else None})
                    dep.set_phase("READY", f"{url}/v1")
                    log(f"READY at {url}/v1 (model {model})")
                    _publish_comment(job_id, f"{url}/v1", log)
                    if renewal is not None:
                        renewal.start()
                elif ready and renewal is not None:
                    successor = renewal.step()
                    if successor is not None:
                        return _hand_over(dep, job_id, successor, log, stop)
            stop.wait(0.2 if rank > 0 else 1.0 if ready else 0.1)  # node 0 reads records: 1 s once READY
    finally:
        if engines:
            log("stopping " + ", ".join(e.process.name for e in reversed(engines)))
        for engine in reversed(engines):  # Ray holds no state: 1 s, so all ends within KillWait
            engine.stop(grace_s=1.0 if engine.process.name == "ray" else 3.0)
        clean_node(rt.tmp_dir, shm_before)
        if engines:
            log("stopped; temp files removed")
    return 0


def _auth_env(spec: DeploymentSpec, api_key: str, tmp_dir: str) -> tuple[tuple[str, str], ...]:
    """The key for the middleware that asks for it on every path (hpc_serve.vllm_auth, copied
    where vLLM's own Python finds it). Not VLLM_API_KEY: vLLM 0.24 hashes that into its compile
    cache key and writes it into the cache folder."""
    from ..vllm_auth import KEY_ENV, OPEN_PATHS_ENV, install

    folder = install(os.path.join(tmp_dir, "py"))
    path = os.pathsep.join(p for p in (folder, dict(spec.env).get("PYTHONPATH") or os.environ.get("PYTHONPATH")) if p)
    return ((KEY_ENV, api_key), ("PYTHONPATH", path),
            (OPEN_PATHS_ENV, "/metrics" if spec.open_metrics else ""))


def _wait_for_ray_token(dep: Deployment, stop: threading.Event) -> bool:
    """A worker waits for the deployment's Ray token, which node 0 writes just before it starts
    the head (False: it never did). The worker then starts at once, alongside the head: its
    `ray start` waits for the head's GCS itself (up to RAY_gcs_server_port_wait_time_s)."""
    from .engine import wait_until

    return wait_until(lambda: dep.read_secret("ray_token") != "" or dep.phase in TERMINAL,
                      JOIN_TIMEOUT_S, stop=stop) and dep.read_secret("ray_token") != ""


def _form_ray(spec: DeploymentSpec, dep: Deployment, rt, head, log: NodeLog,
              stop: threading.Event) -> str | None:
    """Rank 0: wait for the head's port, publish it, and wait until every node and GPU joined."""
    from .engine import exit_reason, wait_until
    from ..planner.ports import port_open
    from .ray_cluster import ClusterProbe, ray_env, ray_python, wait_formed

    lay, address = spec.layout, f"{rt.node_ip}:{rt.ray_port}"
    up = wait_until(lambda: head.exit_code is not None or port_open(rt.node_ip, int(rt.ray_port)),
                    JOIN_TIMEOUT_S, stop=stop)
    if stop.is_set():
        return None
    if head.exit_code is not None:
        return exit_reason("the Ray head", "node 0", head.exit_code, dep.log_path(0))
    if not up:
        return f"the Ray head did not open {address} within {JOIN_TIMEOUT_S:.0f} s"
    dep.write("ray.json", {"address": address})
    _mark(dep, 0, "ray_head_up")
    want_gpus = lay.nodes * lay.gpus_per_node
    dep.set_phase("STARTING", f"Ray head up at {address}; 1/{lay.nodes} nodes")
    nodes = dep.nodes(dep.state.get("restart", 0))
    want = {record["ip"]: lay.gpus_per_node for record in nodes.values()}

    def on_change(formation) -> None:
        text = formation.describe(lay.nodes, want_gpus)
        dep.set_phase("STARTING", text)
        log(text)

    env = {**os.environ, **dict(ray_env(dep.file("ray_token"), JOIN_TIMEOUT_S))}
    probe = ClusterProbe(ray_python(spec.ray_cmd), address, env, dep.log_path(0))
    try:
        formation = wait_formed(probe, want, JOIN_TIMEOUT_S, on_change,
                                lambda: head.exit_code is None, stop)
    finally:
        probe.close()
    if formation.complete:
        _mark(dep, 0, "ray_formed")
        return None
    if stop.is_set():
        return None
    if probe.popen.returncode not in (None, -9):
        return exit_reason("the Ray probe (ray's Python, from --ray-cmd)", "node 0",
                           probe.popen.returncode, dep.log_path(0))
    if head.exit_code is not None:
        return exit_reason("the Ray head", "node 0", head.exit_code, dep.log_path(0))
    missing = [f"{record['hostname']} ({record['ip']})" for record in nodes.values()
               if formation.nodes.get(record["ip"], 0) < lay.gpus_per_node]
    if formation.strangers:
        return (f"Ray registered node(s) at {', '.join(formation.strangers)}, but the agents reported "
                f"{', '.join(missing) or 'other addresses'}: the two disagree on the node's address. "
                "Name the network with --network (an interface such as ib0, or a CIDR).")
    return (f"Ray did not form within {JOIN_TIMEOUT_S:.0f} s: "
            f"{formation.describe(lay.nodes, want_gpus)}; missing: {', '.join(missing)}")


def _sweep_leftovers(job_id: str, log: NodeLog) -> None:
    """End the engines and remove the temp dirs that killed agents of this user's ended jobs left
    on this node (a job Slurm still has, anywhere, is never touched; nor anything when squeue
    cannot say)."""
    from .engine import end_leftovers, sweep_stale_tmp
    from ..slurm import user_jobs

    live = user_jobs()
    for marker, pids in end_leftovers(live, job_id).items():
        log(f"ended {len(pids)} process(es) of {marker} (pids {', '.join(map(str, pids))}), left by "
            "an agent of a job that has ended")
    if live is not None and job_id.isdigit():
        for path in sweep_stale_tmp(live | {job_id}):
            log(f"removed {path}, left by an earlier job that has ended")


def _publish_comment(job_id: str, url: str, log: NodeLog) -> None:
    """Put the endpoint in the job's comment, so that `squeue -o %k` shows it."""
    from ..slurm import which

    scontrol = which("scontrol")
    if not job_id.isdigit() or scontrol is None:
        return
    try:
        done = subprocess.run([scontrol, "update", f"JobId={job_id}", f"Comment={url}"],
                              capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"could not set the job comment: {exc}")
        return
    if done.returncode != 0:
        log(f"could not set the job comment: {done.stderr.strip()}")


def _mark(dep: Deployment, rank: int, event: str, at: float | None = None, fresh: bool = False) -> None:
    """Record when ``event`` happened on node ``rank`` in this run (``fresh``: the run's first)."""
    path = f"timings/{rank}.json"
    os.makedirs(dep.file("timings"), mode=0o700, exist_ok=True)
    before = {} if fresh else dep.read(path, {}) or {}
    dep.write(path, {**before, event: time.time() if at is None else at})


def _rank_and_job() -> tuple[int, str, str]:
    env = os.environ
    if "SLURM_JOB_ID" in env:
        return int(env.get("SLURM_NODEID", "0")), env["SLURM_JOB_ID"], "sbatch"
    return 0, f"local-{os.getpid()}", "local"


def run_task(model: str, node_args: list[str], home: str, local_gpus: str | None = None) -> int:
    """The function submitit runs on every task (one per node). ``local_gpus``: with
    ``--executor local``, the devices of the whole job; each rank takes its own share."""
    import submitit

    job_env = submitit.JobEnvironment()
    spec = node_spec(["--model", model, *node_args], home)
    executor = "local" if job_env.cluster == "local" else "slurm"
    if executor == "local" and local_gpus is not None:
        per_node = spec.layout.gpus_per_node
        mine = local_gpus.split(",")[job_env.global_rank * per_node:(job_env.global_rank + 1) * per_node]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    job_id = str(job_env.job_id) if executor == "slurm" else f"local-{job_env.job_id}"
    code = run(spec, job_env.global_rank, job_id, executor)
    if code:  # a non-zero task exit is what makes srun --kill-on-bad-exit end the other nodes
        raise DeploymentFailed(f"deployment {job_id} failed on node {job_env.global_rank}: "
                               f"see hpc-serve status {job_id}")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m hpc_serve.node` (the sbatch templates' srun line)."""
    try:
        spec = node_spec(sys.argv[1:] if argv is None else argv)
        rank, job_id, executor = _rank_and_job()
        return run(spec, rank, job_id, executor)
    except HpcServeError as exc:
        exc.report("hpc-serve node")
        return exc.exit_code

